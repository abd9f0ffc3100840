//! The dispatcher's first decoder: a client's opening (hello, then maybe a
//! token). Whatever the bytes, `parse_opening` must not panic, must never ask
//! for more than `MAX_OPENING_LEN` bytes, must decide from a prefix alone, and
//! a whole opening must re-encode to exactly the bytes it came from.
#![no_main]

use ipc_core::proto::{self, Opening, HELLO_LEN, MAX_OPENING_LEN, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let verdict = proto::parse_opening(data);
    match verdict {
        Opening::NeedMore(n) => {
            assert!(n > data.len() && n <= MAX_OPENING_LEN, "asked for {n} with {} in hand", data.len());
        }
        Opening::NotOsps => assert!(data[..data.len().min(4)] != proto::MAGIC[..data.len().min(4)]),
        Opening::TokenTooLong(len) => assert!(len > ipc_core::token::MAX_TOKEN_LEN),
        Opening::Hello { version, flags, token, len } => {
            assert!(len <= data.len() && len <= MAX_OPENING_LEN);
            let mut again = Vec::new();
            if version == PROTOCOL_VERSION {
                proto::encode_opening(token, &mut again).expect("a parsed token fits");
                // Flags other than the token bit are ignored by this version.
                again[6..8].copy_from_slice(&flags.to_le_bytes());
            } else {
                assert_eq!((token, len), (None, HELLO_LEN));
                again.extend_from_slice(&proto::encode_hello(version, flags));
            }
            assert_eq!(again, &data[..len]);
            // Bytes after the opening (the first request) never change it.
            assert_eq!(proto::parse_opening(&data[..len]), verdict);
        }
    }
    // Decided on a prefix: a longer input never changes a verdict other than NeedMore.
    for cut in 0..data.len().min(MAX_OPENING_LEN) {
        match proto::parse_opening(&data[..cut]) {
            Opening::NeedMore(n) => assert!(n > cut),
            earlier => assert_eq!(earlier, verdict, "verdict changed after {cut} bytes"),
        }
    }
});
