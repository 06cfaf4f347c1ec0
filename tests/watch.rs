//! How a pending fallback watches its message: less often the longer it waits, on time for its
//! deadline, and not forever.

use std::time::Duration;

use c2m_proto::v1::Channel;
use c2m_test_support::eventually;

use crate::story::{Story, Topology};
use crate::whatsapp_setup::{whatsapp_first, whatsapp_request as request};

/// A WhatsApp-first handoff (SMS next, no deadline), sent: its id.
async fn sent_on_whatsapp(story: &Story, key: &str, phone: &str) -> String {
    let handoff = story.deflect(request(phone, phone), key).await;
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    handoff.handoff_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_message_is_looked_at_less_often_the_longer_it_waits() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let db = sqlx::PgPool::connect(story.db.url()).await.expect("pool");
    let fresh = sent_on_whatsapp(&story, &key, "+14155550701").await;
    let old = sent_on_whatsapp(&story, &key, "+14155550702").await;
    // One of them has waited a minute already.
    sqlx::query(
        "UPDATE handoff.fallbacks SET watched_since = now() - interval '1 minute' \
         WHERE handoff_id = $1",
    )
    .bind(&old)
    .execute(&db)
    .await
    .expect("ages the watch");

    // Once both have been looked at: the fresh one is due again within a fraction of a second,
    // the old one after five.
    let pause = |handoff_id: String| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, Option<f64>>(
                "SELECT extract(epoch FROM next_check - now())::float8 FROM handoff.fallbacks \
                 WHERE handoff_id = $1",
            )
            .bind(handoff_id)
            .fetch_one(&db)
            .await
            .expect("next check")
        }
    };
    eventually(
        "the old watch looked at and put off",
        Duration::from_secs(10),
        || async { pause(old.clone()).await.is_some_and(|p| p > 4.0) },
    )
    .await;
    let fresh_pause = pause(fresh.clone()).await.expect("a pause");
    assert!(fresh_pause <= 0.2 + 0.05, "{fresh_pause}");
    let old_pause = pause(old.clone()).await.expect("a pause");
    assert!(old_pause <= 5.0 + 0.05, "{old_pause}");
    db.close().await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_no_deadline_is_watched_for_a_day_then_left() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let db = sqlx::PgPool::connect(story.db.url()).await.expect("pool");
    let handoff_id = sent_on_whatsapp(&story, &key, "+14155550703").await;
    sqlx::query(
        "UPDATE handoff.fallbacks SET watched_since = now() - interval '25 hours', \
         next_check = now() WHERE handoff_id = $1",
    )
    .bind(&handoff_id)
    .execute(&db)
    .await
    .expect("ages the watch");
    eventually("the watch to end", Duration::from_secs(10), || async {
        story.fallback_of(&handoff_id).await.is_none()
    })
    .await;
    // Left as it was: no SMS, the WhatsApp message the handoff's channel.
    assert!(story.twilio.sent().is_empty());
    let handoff = story.handoff_of("acme", &key, &handoff_id).await;
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    assert_eq!(handoff.attempts.len(), 1);
    db.close().await;
    story.stop().await;
}
