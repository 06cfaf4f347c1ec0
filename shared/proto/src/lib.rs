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

/// A protobuf timestamp for a point in time.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// The point in time a protobuf timestamp names, if it is a valid one.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}
