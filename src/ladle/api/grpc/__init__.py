"""KServe v2 over gRPC: Triton's `inference.GRPCInferenceService` (stubs generated from protos/ at install time)
served with grpc.aio over the same model host, auth keys, limits and errors as the REST adapter."""
