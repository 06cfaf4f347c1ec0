//! The `c2m.v1` protobuf contracts: messages, tonic clients and servers, and the encoded file
//! descriptor set that gRPC reflection serves.

/// Generated from `proto/c2m/v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("c2m.v1");
}

/// The encoded `FileDescriptorSet` of every c2m proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/c2m_descriptor.bin"));
