//! NBD request decoder and validator: any 28 bytes, any export size and negotiation state. Must never
//! panic.
#![no_main]

use cairn_nbd::proto::{REQUEST_HEADER_LEN, decode_request, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < REQUEST_HEADER_LEN + 10 {
        return;
    }
    let mut header = [0u8; REQUEST_HEADER_LEN];
    header.copy_from_slice(&data[..REQUEST_HEADER_LEN]);
    let mut size = [0u8; 8];
    size.copy_from_slice(&data[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + 8]);
    let structured = data[REQUEST_HEADER_LEN + 8] & 1 == 1;
    let meta = data[REQUEST_HEADER_LEN + 9] & 1 == 1;
    if let Ok(h) = decode_request(&header) {
        let _ = validate(&h, u64::from_le_bytes(size), structured, meta);
    }
});
