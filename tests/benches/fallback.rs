//! `cargo bench -p c2m-e2e --bench fallback`: delivery-driven fallback at volume. Many WhatsApp
//! messages go out at once and none is ever reported delivered, so each handoff's SMS must go at
//! its configuration's deadline; prints how late past the deadline they went (the pending
//! fallbacks all watched at once) and the CPU the waiting cost. Asserts nothing.
//!
//! Knobs (environment): C2M_BENCH_FALLBACKS (2000, the handoffs), C2M_BENCH_DEADLINE (10, the
//! delivery deadline in seconds), C2M_BENCH_TOPOLOGY (`dev`, or `separate` for five servers).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(dead_code)]
#[path = "cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "../grpc.rs"]
mod grpc;
#[allow(dead_code)]
#[path = "../story.rs"]
mod story;
#[allow(dead_code)]
#[path = "../whatsapp_setup.rs"]
mod whatsapp_setup;

use std::time::{Duration, Instant};

use c2m_proto::v1::{self as pb, Channel};
use cpu::Cpu;
use story::{Options, Story, Topology, authed};
use whatsapp_setup::{whatsapp_first, whatsapp_request, whatsapp_then_sms};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let count = knob("C2M_BENCH_FALLBACKS", 2000);
    let deadline = knob("C2M_BENCH_DEADLINE", 10);
    let topology = if std::env::var("C2M_BENCH_TOPOLOGY").is_ok_and(|t| t == "separate") {
        Topology::Separate
    } else {
        Topology::Dev
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let story = Story::start_with(
            topology,
            Options {
                db_max_connections: Some(16),
                health_interval_ms: Some(2_000),
                ..Options::default()
            },
        )
        .await;
        let key = whatsapp_first(&story).await;
        story
            .set_settings(
                "acme",
                pb::AccountSettings {
                    deflection_enabled: true,
                    rate_limit_per_second: 100_000,
                    ..Default::default()
                },
            )
            .await;
        story
            .add_config(
                "acme",
                pb::HandoffConfig {
                    delivery_deadline_seconds: deadline as u32,
                    ..whatsapp_then_sms("wa-deadline", "WhatsApp first, SMS at the deadline")
                },
            )
            .await;

        // Every handoff sends on WhatsApp, as fast as 32 callers can.
        let started = Instant::now();
        let handoff = story.handoff().await;
        let callers: Vec<_> = (0..32)
            .map(|c| {
                let (mut handoff, key) = (handoff.clone(), key.clone());
                tokio::spawn(async move {
                    for n in (c..count).step_by(32) {
                        let phone = format!("+1{}", 3_000_000_000 + n);
                        let mut request = whatsapp_request(&phone, &format!("fb-{n}"));
                        request.handoff_config_id = "wa-deadline".into();
                        let sent = handoff
                            .create_handoff(authed(request, &key))
                            .await
                            .expect("handoff")
                            .into_inner()
                            .handoff
                            .expect("handoff");
                        assert_eq!(sent.channel, Channel::Whatsapp as i32);
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.expect("caller");
        }
        let sent_in = started.elapsed();

        // Meta never reports a delivery: each fallback goes at its deadline.
        let db = sqlx::PgPool::connect(story.db.url()).await.expect("pool");
        let before = Cpu::now();
        let waiting = Instant::now();
        let give_up = waiting + Duration::from_secs(deadline + 600);
        loop {
            let fell_back: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM handoff.handoffs WHERE channel = 'CHANNEL_SMS'",
            )
            .fetch_one(&db)
            .await
            .expect("count");
            if fell_back as u64 == count || Instant::now() > give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after = Cpu::now();
        let waited = waiting.elapsed();
        let mut lags: Vec<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM (attempts->1->>'at')::timestamptz \
                 - (attempts->0->>'at')::timestamptz)::float8 - $1 \
             FROM handoff.handoffs WHERE channel = 'CHANNEL_SMS'",
        )
        .bind(deadline as f64)
        .fetch_all(&db)
        .await
        .expect("lags");
        lags.sort_by(f64::total_cmp);
        let at = |q: f64| {
            lags.get(((lags.len().saturating_sub(1)) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
                * 1000.0
        };
        println!(
            "c2m fallback benchmark: {count} WhatsApp handoffs sent in {:.1} s, none delivered, SMS at a {deadline} s deadline",
            sent_in.as_secs_f64()
        );
        println!(
            "  fell back: {} of {count}; lag past the deadline p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            lags.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
        println!(
            "  while they waited and fell back ({:.1} s): {:.2} s cpu in this process, {:.2} s in postgres",
            waited.as_secs_f64(),
            after.this - before.this,
            after.postgres - before.postgres
        );
        db.close().await;
        story.stop().await;
    });
}
