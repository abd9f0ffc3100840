//! Sends N pings on one connection (used to count system calls per request).
fn main() {
    let ep: ipc_core::Endpoint = std::env::args()
        .nth(1)
        .expect("endpoint")
        .parse()
        .expect("endpoint");
    let n: usize = std::env::args()
        .nth(2)
        .map_or(1000, |s| s.parse().expect("count"));
    let mut c = osps_client::Client::connect(&ep).expect("connect");
    for _ in 0..n {
        c.ping().expect("ping");
    }
}
