"""Generated gRPC/protobuf code for the dsaserve API (regenerate with router/proto/generate.sh)."""
