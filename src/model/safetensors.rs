//! safetensors files, memory-mapped.
