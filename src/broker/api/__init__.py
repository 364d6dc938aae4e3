"""gRPC adapters only: servicers, identity from the peer certificate, the call interceptor,
and proto <-> domain conversion. The only layer (with server.py, client.py, cli/) that imports grpc."""
