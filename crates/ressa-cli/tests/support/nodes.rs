//! Ports and flags for running `ressa` as two nodes on 127.0.0.1.

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A coordinator port whose successor (the nodes' fence) is free too.
pub fn coordinator_port() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// `--nodes N --node-rank R --coordinator C --node-address A`.
pub fn node_flags(nodes: usize, rank: usize, coordinator: &str, address: &str) -> Vec<String> {
    [
        "--nodes",
        &nodes.to_string(),
        "--node-rank",
        &rank.to_string(),
        "--coordinator",
        coordinator,
        "--node-address",
        address,
    ]
    .map(String::from)
    .to_vec()
}
