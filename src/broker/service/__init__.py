"""Use-cases, no gRPC: connections, access (grants), resolve, audit."""
