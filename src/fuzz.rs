//! Entry points for the fuzz targets in `fuzz/` (and the test that replays
//! their corpus on every CI run). Not part of the API.

use crate::protocol::{self, FromHost, ToHost, from_msgpack};

/// Reads frames from `data` as both sides do, decoding each body both
/// ways, until the bytes run out or a frame is refused.
pub fn frames(data: &[u8]) {
    let mut input = data;
    while let Ok(body) = protocol::read_frame(&mut input, 1 << 16) {
        let _ = protocol::decode::<ToHost>(&body);
        let _ = protocol::decode::<FromHost>(&body);
    }
}

/// Decodes `data` as the values a manager asks for (with the manager's
/// nesting limit) and as a script value (which is then encoded back, as a
/// reply would be).
pub fn values(data: &[u8]) {
    let _ = from_msgpack::<i64>(data);
    let _ = from_msgpack::<String>(data);
    let _ = from_msgpack::<serde_bytes::ByteBuf>(data);
    let _ = from_msgpack::<Vec<Option<f64>>>(data);
    let _ = from_msgpack::<std::collections::HashMap<String, rmpv::Value>>(data);
    if let Ok(value) = malt_script::decode(data) {
        let _ = malt_script::encode(&value);
    }
}
