"""Code generated from proto/appliance/v1/appliance.proto by grpc_tools.protoc."""
