//! The devices consumers registered for app messaging, by the brand's consumer id (kept by
//! `GatewayStore`).

use c2m_proto::v1::DevicePlatform;

#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub platform: DevicePlatform,
    pub token: String,
}
