"""Generated from protos/loracast/v1/loracast.proto by `make protos`: never edit these modules by hand."""
