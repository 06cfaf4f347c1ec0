//! The `c2m.v1` protobuf contracts: messages, tonic clients and servers, and the encoded file
//! descriptor set that gRPC reflection serves.

pub mod csv;

/// Generated from `proto/c2m/v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("c2m.v1");
}

impl v1::FunnelStage {
    /// Where a message's delivery stage sits on the way to the consumer (SENT 1, DELIVERED 2,
    /// READ 3; FAILED 4 ends the way; 0 for stages that are not a message's): stages only move to
    /// a higher rank.
    pub fn delivery_rank(self) -> u8 {
        match self {
            Self::Sent => 1,
            Self::Delivered => 2,
            Self::Read => 3,
            Self::Failed => 4,
            _ => 0,
        }
    }
}

/// The encoded `FileDescriptorSet` of every c2m proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/c2m_descriptor.bin"));

/// The encoded `FileDescriptorSet` of the `google.rpc` error details c2m attaches to statuses
/// (`ErrorInfo`, `RetryInfo`, `BadRequest`), for gRPC reflection, so that reflection clients
/// print them as fields.
pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/error_details_descriptor.bin"));

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

/// Descriptors of every c2m message, for the proto3 JSON mapping.
pub static DESCRIPTORS: std::sync::LazyLock<prost_reflect::DescriptorPool> =
    std::sync::LazyLock::new(|| {
        prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the build embeds a valid descriptor set")
    });

/// A message in the proto3 JSON mapping (as REST clients and the audit log see it); `name` is its
/// full name, e.g. `c2m.v1.HandoffConfig`.
pub fn to_json<T: prost::Message>(name: &str, message: &T) -> serde_json::Value {
    let Some(descriptor) = DESCRIPTORS.get_message_by_name(name) else {
        return serde_json::Value::Null;
    };
    prost_reflect::DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .ok()
        .and_then(|dynamic| serde_json::to_value(&dynamic).ok())
        .unwrap_or(serde_json::Value::Null)
}
