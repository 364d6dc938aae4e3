"""Generated gRPC stubs; see proto/generate.py."""
