//! Sends one 64 MiB echo (used to count system calls of the bulk path).
fn main() {
    let ep: ipc_core::Endpoint = std::env::args().nth(1).unwrap().parse().unwrap();
    let mut c = osps_client::Client::connect(&ep).unwrap();
    let data = vec![7u8; 64 << 20];
    let r = c.call("echo", &[], &data).unwrap();
    assert_eq!(r.len(), data.len());
}
