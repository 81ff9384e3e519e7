"""Generated gRPC stubs of protos/cl_service/v1 (regenerate with `make proto`)."""
