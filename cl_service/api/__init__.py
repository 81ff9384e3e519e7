"""The gRPC layer: converts protobuf <-> core objects and maps core errors to status codes."""
