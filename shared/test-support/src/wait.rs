use std::{
    future::Future,
    time::{Duration, Instant},
};

/// Polls `condition` until it holds, failing the test with `what` after `deadline`. The way to
/// wait for something asynchronous: never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP port nothing listens on right now (the OS's choice of an ephemeral port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out an ephemeral port")
}

/// Polls `value` until it equals `expected`; after `deadline`, fails showing the last value
/// against the expected one.
pub async fn eventually_eq<T, F, Fut>(what: &str, deadline: Duration, expected: &T, mut value: F)
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let until = Instant::now() + deadline;
    loop {
        let got = value().await;
        if &got == expected {
            return;
        }
        if Instant::now() >= until {
            assert_eq!(
                &got, expected,
                "timed out after {deadline:?} waiting for: {what}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
