//! Ferry's gRPC contract, generated at build time from `proto/ferry/**/*.proto`.
//!
//! The `.proto` files are the API reference; this crate only exports the code
//! tonic generates from them and the descriptor set server reflection serves.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod checksum;
pub mod digest;
pub mod ids;

/// The largest `ChunkDigests.chunk_bytes` (cache.proto): the processor
/// reads one chunk at a time to compare it, so this bounds its memory.
pub const MAX_DIGEST_CHUNK_BYTES: u64 = 4 << 20;

/// Encoded `FileDescriptorSet` of every Ferry package, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));

pub mod registry {
    pub mod v1 {
        tonic::include_proto!("ferry.registry.v1");
    }
}

pub mod cache {
    pub mod v1 {
        tonic::include_proto!("ferry.cache.v1");
    }
}

pub mod processor {
    pub mod v1 {
        tonic::include_proto!("ferry.processor.v1");
    }
}

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("ferry.agent.v1");
    }
}

pub mod failover {
    pub mod v1 {
        tonic::include_proto!("ferry.failover.v1");
    }
}

pub mod audit {
    pub mod v1 {
        tonic::include_proto!("ferry.audit.v1");
    }
}
