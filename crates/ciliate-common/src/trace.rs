//! Observation points of trace events: Cilium's `TRACE_*` numbering.

pub const TO_LXC: u8 = 0;
pub const TO_PROXY: u8 = 1;
pub const TO_HOST: u8 = 2;
pub const TO_STACK: u8 = 3;
pub const TO_OVERLAY: u8 = 4;
pub const FROM_LXC: u8 = 5;
pub const FROM_PROXY: u8 = 6;
pub const FROM_HOST: u8 = 7;
pub const FROM_STACK: u8 = 8;
pub const FROM_OVERLAY: u8 = 9;
pub const FROM_NETWORK: u8 = 10;
pub const TO_NETWORK: u8 = 11;

/// The observation point as Cilium's monitor prints it.
pub fn point_name(point: u8) -> &'static str {
    match point {
        TO_LXC => "to-endpoint",
        TO_PROXY => "to-proxy",
        TO_HOST => "to-host",
        TO_STACK => "to-stack",
        TO_OVERLAY => "to-overlay",
        FROM_LXC => "from-endpoint",
        FROM_PROXY => "from-proxy",
        FROM_HOST => "from-host",
        FROM_STACK => "from-stack",
        FROM_OVERLAY => "from-overlay",
        FROM_NETWORK => "from-network",
        TO_NETWORK => "to-network",
        _ => "unknown",
    }
}
