//! Config's storage contract (`ConfigStore`), one suite run against every backend: PostgreSQL (a
//! database of the test's own) and SQLite (a file of the test's own, as the embedded default
//! keeps it). A backend that passes here serves the Config API, the console and the webhook
//! dispatcher as the other does, and tells watchers of exactly the changes that committed.

use std::{sync::Arc, time::Duration};

use c2m_config::{
    model::{Account, ApiKey, HandoffConfig, Settings, Template, WebhookDelivery, WebhookEndpoint},
    store::{
        Actor, ConfigStore, PgConfigStore, SqliteConfigStore, StoreError, TemplateDeleted, Updated,
        WebhookPosition,
    },
    watch::{ChangeStream, Watch},
};
use c2m_proto::v1::{
    ApiKeyScope, Channel, ConfigResource, WatchConfigResponse, WhatsAppTemplateCategory,
    WhatsAppTemplateStatus,
};
use c2m_test_support::{TestDatabase, eventually};
use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// A backend under test, with what it needs kept alive.
struct Backend {
    store: Arc<dyn ConfigStore>,
    watch: Watch,
    _db: Option<TestDatabase>,
    _dir: Option<tempfile::TempDir>,
    _listening: Option<tokio_util::sync::DropGuard>,
}

impl Backend {
    async fn postgres() -> Self {
        let db = TestDatabase::create().await;
        let service = db.migrated(c2m_config::SCHEMA, &c2m_config::MIGRATOR).await;
        let watch = Watch::new();
        let listening = CancellationToken::new();
        tokio::spawn(
            watch
                .clone()
                .listen(service.pool().clone(), listening.clone()),
        );
        Self {
            store: Arc::new(PgConfigStore::new(service.pool().clone())),
            watch,
            _db: Some(db),
            _dir: None,
            _listening: Some(listening.drop_guard()),
        }
    }

    async fn sqlite() -> Self {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

        let dir = tempfile::tempdir().expect("a temporary directory");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("config.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .expect("opens");
        let watch = Watch::new();
        Self {
            store: Arc::new(
                SqliteConfigStore::new(pool, watch.clone())
                    .await
                    .expect("migrated"),
            ),
            watch,
            _db: None,
            _dir: Some(dir),
            _listening: None,
        }
    }
}

c2m_test_support::conformance!(
    an_account_reads_back_as_written_and_its_id_is_taken_once,
    a_settings_change_is_audited_with_before_and_after,
    configurations_filter_page_and_update_only_at_their_version,
    a_template_in_use_is_not_deleted,
    a_revoked_api_key_no_longer_opens,
    one_delivering_replica_holds_an_endpoint_until_its_lease_lapses,
    positions_move_only_for_the_holder_and_a_delivery_clears_failing,
    an_endpoint_failing_too_long_is_disabled_and_an_admins_disable_holds,
    a_rotated_secret_keeps_signing_while_it_is_kept,
    deliveries_page_newest_first_and_old_ones_are_pruned,
    watchers_hear_of_committed_changes_only,
);

const ADMIN: Actor<'static> = Actor("user:admin@example.com");

/// A time with whole microseconds, as both backends keep them.
fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000 + seconds, 250_000)
        .single()
        .expect("a time")
}

fn account(id: &str) -> Account {
    Account {
        id: id.into(),
        display_name: format!("{id} Inc."),
        settings: Settings {
            deflection_enabled: true,
            landline_check_enabled: true,
            rate_limit_per_second: 7,
            enabled_channels: vec![Channel::Whatsapp, Channel::Sms],
            reply_lookback_hours: 48,
            idle_close_minutes: 90,
            help_text: "Reply STOP to opt out".into(),
            time_zone: "Europe/Paris".into(),
        },
        created_at: at(0),
    }
}

fn config(account_id: &str, id: &str, skill: &str, channels: &[Channel]) -> HandoffConfig {
    HandoffConfig {
        id: id.into(),
        account_id: account_id.into(),
        name: format!("{id} line"),
        skill_id: skill.into(),
        channel_priority: channels.to_vec(),
        // In channel-name order, as both backends read a configuration's messages back.
        messages: vec![
            (Channel::Sms, "Hi {{name}}, text us here".into()),
            (Channel::Whatsapp, "Hello from WhatsApp".into()),
        ],
        whatsapp_template_id: None,
        apple_business_id: String::new(),
        apple_intent_id: String::new(),
        apple_group_id: String::new(),
        apple_body: String::new(),
        delivery_deadline_seconds: 45,
        version: 1,
        updated_at: at(10),
    }
}

fn template(account_id: &str, id: &str, name: &str) -> Template {
    Template {
        id: id.into(),
        account_id: account_id.into(),
        name: name.into(),
        language: "en_US".into(),
        category: WhatsAppTemplateCategory::Utility,
        body: "Hi {{1}}, continue here".into(),
        status: WhatsAppTemplateStatus::Pending,
    }
}

fn endpoint(account_id: &str, id: &str) -> WebhookEndpoint {
    WebhookEndpoint {
        id: id.into(),
        account_id: account_id.into(),
        url: format!("https://crm.example.com/hooks/{id}"),
        description: "the CRM".into(),
        event_types: vec!["conversation.opened".into(), "handoff.sent".into()],
        enabled: true,
        disabled_reason: String::new(),
        failing_since: None,
        created_at: at(20),
        updated_at: at(20),
    }
}

fn delivery(endpoint_id: &str, n: u32) -> WebhookDelivery {
    WebhookDelivery {
        endpoint_id: endpoint_id.into(),
        webhook_id: format!("evt_{n}"),
        event_type: "conversation.opened".into(),
        attempt: n,
        http_status: 500 + n as u16,
        error: format!("attempt {n}"),
        duration_ms: 10 * n,
        succeeded: n.is_multiple_of(2),
        at: at(i64::from(n)),
    }
}

async fn an_account_reads_back_as_written_and_its_id_is_taken_once(b: &Backend) {
    let store = &b.store;
    let acme = account("acme");
    store.create_account(&acme, ADMIN).await.expect("created");
    assert_eq!(
        store.account("acme").await.expect("read"),
        Some(acme.clone())
    );
    assert_eq!(store.account("nobody").await.expect("read"), None);
    let again = store.create_account(&account("acme"), ADMIN).await;
    assert!(
        matches!(again, Err(StoreError::Conflict("account"))),
        "{again:?}"
    );
}

async fn a_settings_change_is_audited_with_before_and_after(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    store
        .create_account(&account("other"), ADMIN)
        .await
        .expect("created");
    let settings = Settings {
        rate_limit_per_second: 30,
        enabled_channels: vec![Channel::Rcs],
        time_zone: String::new(),
        ..account("acme").settings
    };
    let after = store
        .update_settings("acme", &settings, Actor("user:ops@example.com"))
        .await
        .expect("updated")
        .expect("the account is there");
    assert_eq!(after.settings, settings);
    assert_eq!(store.account("acme").await.expect("read"), Some(after));
    assert_eq!(
        store
            .update_settings("nobody", &settings, ADMIN)
            .await
            .expect("no error"),
        None
    );

    let (start, end) = (
        Utc::now() - chrono::Duration::hours(1),
        Utc::now() + chrono::Duration::hours(1),
    );
    let records = store.audit("acme", start, end, 0, 10).await.expect("audit");
    let actions: Vec<_> = records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["CreateAccount", "UpdateAccountSettings"]);
    let change = &records[1];
    assert_eq!(change.actor, "user:ops@example.com");
    assert_eq!(change.resource, "accounts/acme");
    let limit = |r: &Option<serde_json::Value>| {
        r.as_ref()
            .and_then(|v| v.pointer("/settings/rateLimitPerSecond"))
            .cloned()
    };
    assert_eq!(limit(&change.before), Some(7.into()));
    assert_eq!(limit(&change.after), Some(30.into()));
    // Paged after a record, and limited to the period.
    let next = store
        .audit("acme", start, end, records[0].id, 10)
        .await
        .expect("audit");
    assert_eq!(next, records[1..]);
    let before_any = store
        .audit("acme", start - chrono::Duration::hours(2), start, 0, 10)
        .await
        .expect("audit");
    assert!(before_any.is_empty());
}

async fn configurations_filter_page_and_update_only_at_their_version(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    let billing = config(
        "acme",
        "billing",
        "billing-agents",
        &[Channel::Whatsapp, Channel::Sms],
    );
    let sales = config("acme", "sales", "sales-agents", &[Channel::Sms]);
    let support = config("acme", "support", "billing-agents", &[Channel::Rcs]);
    for c in [&billing, &sales, &support] {
        store
            .create_handoff_config(c, ADMIN)
            .await
            .expect("created");
    }
    assert_eq!(
        store.handoff_config("acme", "billing").await.expect("read"),
        Some(billing.clone())
    );
    let ids = |configs: Vec<HandoffConfig>| configs.into_iter().map(|c| c.id).collect::<Vec<_>>();
    let list = |after: &'static str, limit, channel, skill| {
        let store = store.clone();
        async move {
            ids(store
                .handoff_configs("acme", after, limit, channel, skill)
                .await
                .expect("listed"))
        }
    };
    assert_eq!(
        list("", 10, None, None).await,
        ["billing", "sales", "support"]
    );
    assert_eq!(list("billing", 1, None, None).await, ["sales"]);
    assert_eq!(
        list("", 10, Some(Channel::Sms), None).await,
        ["billing", "sales"]
    );
    assert_eq!(
        list("", 10, None, Some("billing-agents")).await,
        ["billing", "support"]
    );
    assert_eq!(
        list("", 10, Some(Channel::Rcs), Some("billing-agents")).await,
        ["support"]
    );

    // A name is the account's once.
    let twin = HandoffConfig {
        id: "billing-2".into(),
        ..billing.clone()
    };
    assert!(matches!(
        store.create_handoff_config(&twin, ADMIN).await,
        Err(StoreError::Conflict(_))
    ));

    let edited = HandoffConfig {
        channel_priority: vec![Channel::Sms],
        delivery_deadline_seconds: 0,
        ..billing.clone()
    };
    let Updated::Done(now) = store
        .update_handoff_config(&edited, ADMIN)
        .await
        .expect("updated")
    else {
        panic!("the update at the current version applies");
    };
    assert_eq!(now.version, 2);
    assert_eq!(now.channel_priority, [Channel::Sms]);
    assert!(now.updated_at > billing.updated_at);
    // The same edit again is at a version that is gone.
    assert!(matches!(
        store.update_handoff_config(&edited, ADMIN).await,
        Ok(Updated::Stale(2))
    ));
    let renamed = HandoffConfig {
        name: sales.name.clone(),
        version: 2,
        ..billing.clone()
    };
    assert!(matches!(
        store.update_handoff_config(&renamed, ADMIN).await,
        Err(StoreError::Conflict(_))
    ));
    let gone = HandoffConfig {
        id: "nothing".into(),
        ..billing.clone()
    };
    assert!(matches!(
        store.update_handoff_config(&gone, ADMIN).await,
        Ok(Updated::Missing)
    ));
    assert!(
        store
            .delete_handoff_config("acme", "sales", ADMIN)
            .await
            .expect("deleted")
    );
    assert!(
        !store
            .delete_handoff_config("acme", "sales", ADMIN)
            .await
            .expect("no error")
    );
    assert_eq!(list("", 10, None, None).await, ["billing", "support"]);
}

async fn a_template_in_use_is_not_deleted(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    let welcome = template("acme", "tpl-welcome", "welcome");
    let spare = template("acme", "tpl-spare", "spare");
    store
        .create_template(&welcome, ADMIN)
        .await
        .expect("created");
    store.create_template(&spare, ADMIN).await.expect("created");
    // Name and language are Meta's key: once per account.
    assert!(matches!(
        store
            .create_template(&template("acme", "tpl-other", "welcome"), ADMIN)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let billing = HandoffConfig {
        whatsapp_template_id: Some("tpl-welcome".into()),
        ..config("acme", "billing", "agents", &[Channel::Whatsapp])
    };
    store
        .create_handoff_config(&billing, ADMIN)
        .await
        .expect("created");
    assert_eq!(
        store.handoff_config("acme", "billing").await.expect("read"),
        Some(billing)
    );
    match store
        .delete_template("acme", "tpl-welcome", ADMIN)
        .await
        .expect("answered")
    {
        TemplateDeleted::InUse(users) => assert_eq!(users, ["billing"]),
        other => panic!("deleted a template in use: {other:?}"),
    }
    assert_eq!(
        store
            .template_named("acme", "welcome", "en_US")
            .await
            .expect("read"),
        Some(welcome.clone())
    );
    let approved = store
        .set_template_status(
            "acme",
            "tpl-welcome",
            WhatsAppTemplateStatus::Approved,
            ADMIN,
        )
        .await
        .expect("set")
        .expect("there");
    assert_eq!(approved.status, WhatsAppTemplateStatus::Approved);
    assert_eq!(
        store.template("acme", "tpl-welcome").await.expect("read"),
        Some(approved)
    );
    let page: Vec<_> = store
        .templates("acme", "", 1)
        .await
        .expect("listed")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(page, ["tpl-spare"]);
    assert!(matches!(
        store.delete_template("acme", "tpl-spare", ADMIN).await,
        Ok(TemplateDeleted::Done)
    ));
    assert!(matches!(
        store.delete_template("acme", "tpl-spare", ADMIN).await,
        Ok(TemplateDeleted::Missing)
    ));
}

async fn a_revoked_api_key_no_longer_opens(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    let key = ApiKey {
        id: "key-ivr".into(),
        account_id: "acme".into(),
        name: "the IVR".into(),
        prefix: "c2m_live_ab".into(),
        scopes: vec![ApiKeyScope::Handoffs, ApiKeyScope::Conversations],
        created_at: at(30),
        last_used_at: None,
        revoked_at: None,
    };
    store
        .create_api_key(&key, b"hash-of-the-key", ADMIN)
        .await
        .expect("created");
    let twin = ApiKey {
        id: "key-twin".into(),
        ..key.clone()
    };
    assert!(matches!(
        store.create_api_key(&twin, b"hash-of-the-key", ADMIN).await,
        Err(StoreError::Conflict(_))
    ));
    let used = store
        .use_api_key(b"hash-of-the-key")
        .await
        .expect("looked up")
        .expect("the key opens");
    assert_eq!(used.scopes, key.scopes);
    assert!(used.last_used_at.is_some());
    assert_eq!(
        store.use_api_key(b"another hash").await.expect("looked up"),
        None
    );
    assert!(
        store
            .revoke_api_key("acme", "key-ivr", ADMIN)
            .await
            .expect("revoked")
    );
    assert!(
        !store
            .revoke_api_key("acme", "key-ivr", ADMIN)
            .await
            .expect("no error")
    );
    assert_eq!(
        store
            .use_api_key(b"hash-of-the-key")
            .await
            .expect("looked up"),
        None
    );
    let listed = store.api_keys("acme").await.expect("listed");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].revoked_at.is_some());
}

async fn one_delivering_replica_holds_an_endpoint_until_its_lease_lapses(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    for id in ["wh-1", "wh-2"] {
        store
            .create_webhook_endpoint(&endpoint("acme", id), b"secret", ADMIN)
            .await
            .expect("created");
    }
    let off = WebhookEndpoint {
        enabled: false,
        ..endpoint("acme", "wh-off")
    };
    store
        .create_webhook_endpoint(&off, b"secret", ADMIN)
        .await
        .expect("created");
    let held = |owner: &'static str, ttl| {
        let store = store.clone();
        async move {
            let mut ids: Vec<_> = store
                .lease_webhooks(owner, ttl)
                .await
                .expect("leased")
                .into_iter()
                .map(|w| w.endpoint.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let short = Duration::from_millis(300);
    assert_eq!(held("replica-a", short).await, ["wh-1", "wh-2"]);
    // Renewing is taking again; another replica gets nothing while the lease lives.
    assert_eq!(held("replica-a", short).await, ["wh-1", "wh-2"]);
    assert!(held("replica-b", short).await.is_empty());
    let first = store
        .lease_webhooks("replica-a", short)
        .await
        .expect("leased");
    assert_eq!(first[0].secret, b"secret");
    assert_eq!(first[0].cursor, "");
    assert_eq!(first[0].handoff_position, None);
    eventually(
        "replica-b takes the endpoints once replica-a's lease lapses",
        Duration::from_secs(10),
        || async { held("replica-b", Duration::from_secs(60)).await == ["wh-1", "wh-2"] },
    )
    .await;
    assert!(held("replica-a", short).await.is_empty());
}

async fn positions_move_only_for_the_holder_and_a_delivery_clears_failing(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    store
        .create_webhook_endpoint(&endpoint("acme", "wh-1"), b"secret", ADMIN)
        .await
        .expect("created");
    let hour = Duration::from_secs(3600);
    store
        .lease_webhooks("replica-a", hour)
        .await
        .expect("leased");
    let cursor = WebhookPosition::Conversations("cur-42");
    assert!(
        store
            .webhook_passed("wh-1", "replica-a", cursor, false)
            .await
            .expect("moved")
    );
    assert!(
        store
            .webhook_passed("wh-1", "replica-a", WebhookPosition::Handoffs(17), false)
            .await
            .expect("moved")
    );
    assert!(
        !store
            .webhook_passed("wh-1", "replica-b", WebhookPosition::Handoffs(99), true)
            .await
            .expect("answered")
    );
    let leased = store
        .lease_webhooks("replica-a", hour)
        .await
        .expect("leased");
    assert_eq!(leased[0].cursor, "cur-42");
    assert_eq!(leased[0].handoff_position, Some(17));

    // A failure marks it failing; passing over an event does not clear that, a delivery does.
    assert!(
        store
            .webhook_failed("wh-1", "replica-a", hour)
            .await
            .expect("recorded")
    );
    let failing = |store: Arc<dyn ConfigStore>| async move {
        store
            .webhook_endpoint("acme", "wh-1")
            .await
            .expect("read")
            .expect("there")
            .failing_since
    };
    let since = failing(store.clone()).await.expect("failing");
    assert!(
        store
            .webhook_failed("wh-1", "replica-a", hour)
            .await
            .expect("recorded")
    );
    assert_eq!(
        failing(store.clone()).await,
        Some(since),
        "failing since the first failure"
    );
    store
        .webhook_passed("wh-1", "replica-a", WebhookPosition::Handoffs(18), false)
        .await
        .expect("moved");
    assert_eq!(failing(store.clone()).await, Some(since));
    store
        .webhook_passed("wh-1", "replica-a", WebhookPosition::Handoffs(19), true)
        .await
        .expect("moved");
    assert_eq!(failing(store.clone()).await, None);
    // Not the holder: a failure is not recorded.
    assert!(
        !store
            .webhook_failed("wh-1", "replica-b", hour)
            .await
            .expect("answered")
    );
    assert_eq!(failing(store.clone()).await, None);
}

async fn an_endpoint_failing_too_long_is_disabled_and_an_admins_disable_holds(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    for id in ["wh-1", "wh-2"] {
        store
            .create_webhook_endpoint(&endpoint("acme", id), b"secret", ADMIN)
            .await
            .expect("created");
    }
    let hour = Duration::from_secs(3600);
    store
        .lease_webhooks("replica-a", hour)
        .await
        .expect("leased");
    // Failing for longer than allowed (nothing is allowed here): disabled, saying why.
    assert!(
        !store
            .webhook_failed("wh-1", "replica-a", Duration::ZERO)
            .await
            .expect("recorded")
    );
    let disabled = store
        .webhook_endpoint("acme", "wh-1")
        .await
        .expect("read")
        .expect("there");
    assert!(!disabled.enabled);
    assert!(
        disabled
            .disabled_reason
            .starts_with("deliveries failed since ")
            && disabled
                .disabled_reason
                .ends_with("; enable it again to resume"),
        "{}",
        disabled.disabled_reason
    );
    // Enabled again by an admin: not failing any more.
    let enabled = store
        .update_webhook_endpoint(
            &WebhookEndpoint {
                enabled: true,
                disabled_reason: String::new(),
                ..disabled
            },
            ADMIN,
        )
        .await
        .expect("updated")
        .expect("there");
    assert!(enabled.enabled && enabled.failing_since.is_none());

    // An admin disables an endpoint while a delivery to it is under way; the delivery fails.
    let paused = store
        .update_webhook_endpoint(
            &WebhookEndpoint {
                enabled: false,
                disabled_reason: "paused for maintenance".into(),
                ..endpoint("acme", "wh-2")
            },
            ADMIN,
        )
        .await
        .expect("updated")
        .expect("there");
    assert!(!paused.enabled);
    assert!(
        !store
            .webhook_failed("wh-2", "replica-a", hour)
            .await
            .expect("recorded")
    );
    let after = store
        .webhook_endpoint("acme", "wh-2")
        .await
        .expect("read")
        .expect("there");
    assert!(
        !after.enabled,
        "a failed delivery enabled what an admin disabled"
    );
    assert_eq!(after.disabled_reason, "paused for maintenance");
}

async fn a_rotated_secret_keeps_signing_while_it_is_kept(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    for id in ["wh-1", "wh-2"] {
        store
            .create_webhook_endpoint(&endpoint("acme", id), b"old", ADMIN)
            .await
            .expect("created");
    }
    let hour = Duration::from_secs(3600);
    assert!(
        store
            .rotate_webhook_secret("acme", "wh-1", b"new", hour, ADMIN)
            .await
            .expect("rotated")
    );
    assert!(
        store
            .rotate_webhook_secret("acme", "wh-2", b"new", Duration::ZERO, ADMIN)
            .await
            .expect("rotated")
    );
    assert!(
        !store
            .rotate_webhook_secret("acme", "nothing", b"new", hour, ADMIN)
            .await
            .expect("answered")
    );
    let kept = store
        .webhook_for_test("acme", "wh-1")
        .await
        .expect("read")
        .expect("there");
    assert_eq!(
        (kept.secret, kept.previous_secret),
        (b"new".to_vec(), Some(b"old".to_vec()))
    );
    let dropped = store
        .webhook_for_test("acme", "wh-2")
        .await
        .expect("read")
        .expect("there");
    assert_eq!(
        (dropped.secret, dropped.previous_secret),
        (b"new".to_vec(), None)
    );
    // A rotation is a change the delivering replica must pick up.
    assert!(kept.version > 1);
}

async fn deliveries_page_newest_first_and_old_ones_are_pruned(b: &Backend) {
    let store = &b.store;
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    store
        .create_webhook_endpoint(&endpoint("acme", "wh-1"), b"secret", ADMIN)
        .await
        .expect("created");
    for n in 1..=5 {
        store
            .record_webhook_delivery(&delivery("wh-1", n))
            .await
            .expect("recorded");
    }
    let recent = WebhookDelivery {
        at: Utc::now(),
        ..delivery("wh-1", 6)
    };
    store
        .record_webhook_delivery(&recent)
        .await
        .expect("recorded");
    let first = store.webhook_deliveries("wh-1", 0, 2).await.expect("read");
    assert_eq!(
        first.iter().map(|(_, d)| d.attempt).collect::<Vec<_>>(),
        [6, 5]
    );
    assert_eq!(first[1].1, delivery("wh-1", 5));
    let next = store
        .webhook_deliveries("wh-1", first[1].0, 10)
        .await
        .expect("read");
    assert_eq!(
        next.iter().map(|(_, d)| d.attempt).collect::<Vec<_>>(),
        [4, 3, 2, 1]
    );
    assert_eq!(
        store
            .prune_webhook_deliveries(Duration::from_secs(24 * 3600))
            .await
            .expect("pruned"),
        5
    );
    let left = store.webhook_deliveries("wh-1", 0, 10).await.expect("read");
    assert_eq!(left.len(), 1);
    // Deleting the endpoint takes its deliveries with it.
    assert!(
        store
            .delete_webhook_endpoint("acme", "wh-1", ADMIN)
            .await
            .expect("deleted")
    );
    assert!(
        store
            .webhook_deliveries("wh-1", 0, 10)
            .await
            .expect("read")
            .is_empty()
    );
}

/// The next change heard within a moment, if any.
async fn next(changes: &mut ChangeStream) -> Option<WatchConfigResponse> {
    tokio::time::timeout(Duration::from_millis(200), changes.next())
        .await
        .ok()
        .flatten()
        .map(|c| c.expect("no lag"))
}

async fn watchers_hear_of_committed_changes_only(b: &Backend) {
    let store = &b.store;
    let mut changes = b.watch.subscribe("acme".into());
    store
        .create_account(&account("acme"), ADMIN)
        .await
        .expect("created");
    // PostgreSQL's listener may join after the first change: change settings until one is heard.
    let mut heard = next(&mut changes).await;
    let mut settings = account("acme").settings;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while heard.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no change heard within 10 s"
        );
        settings.rate_limit_per_second += 1;
        store
            .update_settings("acme", &settings, ADMIN)
            .await
            .expect("updated");
        heard = next(&mut changes).await;
    }
    while next(&mut changes).await.is_some() {}

    // Refused writes publish nothing; the committed one after them is the next heard.
    let billing = config("acme", "billing", "agents", &[Channel::Sms]);
    store
        .create_handoff_config(&billing, ADMIN)
        .await
        .expect("created");
    assert!(store.create_handoff_config(&billing, ADMIN).await.is_err());
    assert!(matches!(
        store.update_handoff_config(&billing, ADMIN).await,
        Ok(Updated::Done(_))
    ));
    let heard: Vec<WatchConfigResponse> = {
        let mut all = Vec::new();
        while let Some(change) = next(&mut changes).await {
            all.push(change);
        }
        all
    };
    let what: Vec<_> = heard
        .iter()
        .map(|c| (c.resource(), c.resource_id.as_str()))
        .collect();
    assert_eq!(
        what,
        [
            (ConfigResource::HandoffConfig, "billing"),
            (ConfigResource::HandoffConfig, "billing")
        ],
        "the creation and the update, not the refused second creation"
    );
    // Another account's changes are not this watcher's.
    store
        .create_account(&account("other"), ADMIN)
        .await
        .expect("created");
    assert_eq!(next(&mut changes).await, None);
}
