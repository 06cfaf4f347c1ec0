//! The brand's control plane: every Config RPC against every role, optimistic concurrency,
//! validation naming its field, templates in use, paging and the audit log.

use c2m_proto::v1::{self as pb, Channel, config_service_client::ConfigServiceClient};
use c2m_runtime::auth::{Role as AuthRole, TokenKey};
use tonic::{Code, transport::Channel as GrpcChannel};
use tonic_types::StatusExt;

use crate::story::{SECRET, Story, Topology, authed, onboard, token};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Nobody,
    Viewer,
    Editor,
    Admin,
    OtherAccountAdmin,
    Operator,
    Service,
}

const CALLERS: [Caller; 7] = [
    Caller::Nobody,
    Caller::Viewer,
    Caller::Editor,
    Caller::Admin,
    Caller::OtherAccountAdmin,
    Caller::Operator,
    Caller::Service,
];

/// Who may call an RPC (on account acme).
#[derive(Debug, Clone, Copy)]
enum Needs {
    AtLeast(AuthRole),
    Operator,
    Internal,
}

fn allowed(needs: Needs, caller: Caller) -> bool {
    let rank = |c: Caller| match c {
        Caller::Viewer => Some(AuthRole::Viewer),
        Caller::Editor => Some(AuthRole::Editor),
        Caller::Admin => Some(AuthRole::Admin),
        _ => None,
    };
    match (needs, caller) {
        (_, Caller::Nobody | Caller::OtherAccountAdmin) => false,
        (Needs::Internal, c) => matches!(c, Caller::Service | Caller::Operator),
        (Needs::Operator, c) => c == Caller::Operator,
        (Needs::AtLeast(_), Caller::Operator) => true,
        (Needs::AtLeast(min), Caller::Service) => min == AuthRole::Viewer,
        (Needs::AtLeast(min), c) => rank(c).is_some_and(|r| r >= min),
    }
}

fn credential(caller: Caller) -> Option<String> {
    match caller {
        Caller::Nobody => None,
        Caller::Viewer => Some(token(AuthRole::Viewer, Some("acme"))),
        Caller::Editor => Some(token(AuthRole::Editor, Some("acme"))),
        Caller::Admin => Some(token(AuthRole::Admin, Some("acme"))),
        Caller::OtherAccountAdmin => Some(token(AuthRole::Admin, Some("globex"))),
        Caller::Operator => Some(token(AuthRole::Operator, None)),
        Caller::Service => Some(TokenKey::new(SECRET.as_bytes()).service_token("test")),
    }
}

fn request<T>(message: T, caller: Caller) -> tonic::Request<T> {
    match credential(caller) {
        Some(credential) => authed(message, &credential),
        None => tonic::Request::new(message),
    }
}

/// Calls `rpc` as `caller` with a request that changes nothing when allowed (it names things that
/// do not exist, or is invalid); the gRPC code it got.
async fn call(client: &mut ConfigServiceClient<GrpcChannel>, rpc: &str, caller: Caller) -> Code {
    let acme = || "acme".to_owned();
    let result = match rpc {
        "CreateAccount" => client
            .create_account(request(
                pb::CreateAccountRequest {
                    account_id: "x".into(),
                    ..Default::default()
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "GetAccount" => client
            .get_account(request(
                pb::GetAccountRequest { account_id: acme() },
                caller,
            ))
            .await
            .map(|_| ()),
        "UpdateAccountSettings" => client
            .update_account_settings(request(
                pb::UpdateAccountSettingsRequest {
                    account_id: acme(),
                    settings: None,
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "CreateHandoffConfig" => client
            .create_handoff_config(request(
                pb::CreateHandoffConfigRequest {
                    account_id: acme(),
                    config: None,
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "GetHandoffConfig" => client
            .get_handoff_config(request(
                pb::GetHandoffConfigRequest {
                    account_id: acme(),
                    handoff_config_id: "nope".into(),
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "ListHandoffConfigs" => client
            .list_handoff_configs(request(
                pb::ListHandoffConfigsRequest {
                    account_id: acme(),
                    ..Default::default()
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "UpdateHandoffConfig" => client
            .update_handoff_config(request(
                pb::UpdateHandoffConfigRequest {
                    account_id: acme(),
                    config: None,
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "DeleteHandoffConfig" => client
            .delete_handoff_config(request(
                pb::DeleteHandoffConfigRequest {
                    account_id: acme(),
                    handoff_config_id: "nope".into(),
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "CreateWhatsAppTemplate" => client
            .create_whats_app_template(request(
                pb::CreateWhatsAppTemplateRequest {
                    account_id: acme(),
                    template: None,
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "ListWhatsAppTemplates" => client
            .list_whats_app_templates(request(
                pb::ListWhatsAppTemplatesRequest {
                    account_id: acme(),
                    ..Default::default()
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "DeleteWhatsAppTemplate" => client
            .delete_whats_app_template(request(
                pb::DeleteWhatsAppTemplateRequest {
                    account_id: acme(),
                    template_id: "nope".into(),
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "UpdateWhatsAppTemplateStatus" => client
            .update_whats_app_template_status(request(
                pb::UpdateWhatsAppTemplateStatusRequest {
                    account_id: acme(),
                    template_id: "nope".into(),
                    status: 0,
                    ..Default::default()
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "CreateApiKey" => client
            .create_api_key(request(
                pb::CreateApiKeyRequest {
                    account_id: acme(),
                    name: String::new(),
                    scopes: Vec::new(),
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "ListApiKeys" => client
            .list_api_keys(request(
                pb::ListApiKeysRequest { account_id: acme() },
                caller,
            ))
            .await
            .map(|_| ()),
        "RevokeApiKey" => client
            .revoke_api_key(request(
                pb::RevokeApiKeyRequest {
                    account_id: acme(),
                    api_key_id: "nope".into(),
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "AuthenticateApiKey" => client
            .authenticate_api_key(request(
                pb::AuthenticateApiKeyRequest {
                    plaintext: "c2m_nope".into(),
                },
                caller,
            ))
            .await
            .map(|_| ()),
        "ListAuditEvents" => client
            .list_audit_events(request(
                pb::ListAuditEventsRequest {
                    account_id: acme(),
                    ..Default::default()
                },
                caller,
            ))
            .await
            .map(|_| ()),
        other => panic!("no call for {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_config_rpc_checks_account_and_role() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let mut client = story.config().await;
    let rpcs = [
        ("CreateAccount", Needs::Operator),
        ("GetAccount", Needs::AtLeast(AuthRole::Viewer)),
        ("UpdateAccountSettings", Needs::AtLeast(AuthRole::Admin)),
        ("CreateHandoffConfig", Needs::AtLeast(AuthRole::Editor)),
        ("GetHandoffConfig", Needs::AtLeast(AuthRole::Viewer)),
        ("ListHandoffConfigs", Needs::AtLeast(AuthRole::Viewer)),
        ("UpdateHandoffConfig", Needs::AtLeast(AuthRole::Editor)),
        ("DeleteHandoffConfig", Needs::AtLeast(AuthRole::Editor)),
        ("CreateWhatsAppTemplate", Needs::AtLeast(AuthRole::Editor)),
        ("ListWhatsAppTemplates", Needs::AtLeast(AuthRole::Viewer)),
        ("DeleteWhatsAppTemplate", Needs::AtLeast(AuthRole::Editor)),
        ("UpdateWhatsAppTemplateStatus", Needs::Internal),
        ("CreateApiKey", Needs::AtLeast(AuthRole::Admin)),
        ("ListApiKeys", Needs::AtLeast(AuthRole::Admin)),
        ("RevokeApiKey", Needs::AtLeast(AuthRole::Admin)),
        ("AuthenticateApiKey", Needs::Internal),
        ("ListAuditEvents", Needs::AtLeast(AuthRole::Admin)),
    ];
    let mut wrong = Vec::new();
    for (rpc, needs) in rpcs {
        for caller in CALLERS {
            let code = call(&mut client, rpc, caller).await;
            let expected_refusal = match caller {
                Caller::Nobody => Some(Code::Unauthenticated),
                c if !allowed(needs, c) => Some(Code::PermissionDenied),
                _ => None,
            };
            let ok = match expected_refusal {
                Some(refusal) => code == refusal,
                None => !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
            };
            if !ok {
                wrong.push(format!(
                    "{rpc} as {caller:?}: {code:?}, expected {expected_refusal:?}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    story.stop().await;
}

fn sms_config(id: &str, skill: &str) -> pb::HandoffConfig {
    pb::HandoffConfig {
        handoff_config_id: id.into(),
        name: format!("config {id}"),
        skill_id: skill.into(),
        channel_priority: vec![Channel::Sms as i32],
        messages: vec![pb::ChannelMessage {
            channel: Channel::Sms as i32,
            text: "Hi, text us here.".into(),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_update_is_aborted_and_exactly_one_concurrent_update_wins() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let editor = token(AuthRole::Editor, Some("acme"));
    let client = story.config().await;
    let current = client
        .clone()
        .get_handoff_config(authed(
            pb::GetHandoffConfigRequest {
                account_id: "acme".into(),
                handoff_config_id: "billing".into(),
            },
            &editor,
        ))
        .await
        .expect("read")
        .into_inner()
        .config
        .expect("config");
    assert_eq!(current.version, 1);

    // Eight editors change the configuration they all read at version 1.
    let updates = (0..8).map(|i| {
        let mut client = client.clone();
        let mut config = current.clone();
        config.skill_id = format!("skill-{i}");
        let editor = editor.clone();
        async move {
            client
                .update_handoff_config(authed(
                    pb::UpdateHandoffConfigRequest {
                        account_id: "acme".into(),
                        config: Some(config),
                    },
                    &editor,
                ))
                .await
        }
    });
    let results = futures::future::join_all(updates).await;
    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    assert_eq!(won[0].get_ref().config.as_ref().expect("config").version, 2);
    for lost in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(lost.code(), Code::Aborted, "{lost:?}");
        assert!(lost.message().contains("version 2"), "{lost:?}");
    }
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_configuration_names_its_field() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let admin = token(AuthRole::Admin, Some("acme"));
    let mut client = story.config().await;
    client
        .update_account_settings(authed(
            pb::UpdateAccountSettingsRequest {
                account_id: "acme".into(),
                settings: Some(pb::AccountSettings {
                    deflection_enabled: true,
                    enabled_channels: vec![Channel::Sms as i32, Channel::Whatsapp as i32],
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("settings");
    let template = client
        .create_whats_app_template(authed(
            pb::CreateWhatsAppTemplateRequest {
                account_id: "acme".into(),
                template: Some(pb::WhatsAppTemplate {
                    name: "billing_followup".into(),
                    language: "en_US".into(),
                    category: pb::WhatsAppTemplateCategory::Utility as i32,
                    body: "Hi {{1}}, reply here about your bill.".into(),
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("template")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(template.status, pb::WhatsAppTemplateStatus::Pending as i32);

    let base = || sms_config("cfg", "billing-agents");
    let cases: Vec<(&str, pb::HandoffConfig, &str)> = vec![
        (
            "unknown channel",
            pb::HandoffConfig {
                channel_priority: vec![999],
                messages: vec![],
                ..base()
            },
            "config.channel_priority[0]",
        ),
        (
            "channel not enabled on the account",
            pb::HandoffConfig {
                channel_priority: vec![Channel::Sms as i32, Channel::Rcs as i32],
                ..base()
            },
            "config.channel_priority[1]",
        ),
        (
            "no channel",
            pb::HandoffConfig {
                channel_priority: vec![],
                messages: vec![],
                ..base()
            },
            "config.channel_priority",
        ),
        (
            "template not approved",
            pb::HandoffConfig {
                channel_priority: vec![Channel::Whatsapp as i32],
                messages: vec![],
                whatsapp_template_id: template.template_id.clone(),
                ..base()
            },
            "config.whatsapp_template_id",
        ),
        (
            "SMS over 1600 characters",
            pb::HandoffConfig {
                messages: vec![pb::ChannelMessage {
                    channel: Channel::Sms as i32,
                    text: "x".repeat(1601),
                }],
                ..base()
            },
            "config.messages[0].text",
        ),
        (
            "WhatsApp over 4096 characters",
            pb::HandoffConfig {
                channel_priority: vec![Channel::Whatsapp as i32],
                messages: vec![pb::ChannelMessage {
                    channel: Channel::Whatsapp as i32,
                    text: "x".repeat(4097),
                }],
                ..base()
            },
            "config.messages[0].text",
        ),
        (
            "no skill",
            pb::HandoffConfig {
                skill_id: String::new(),
                ..base()
            },
            "config.skill_id",
        ),
        (
            "an Apple Messages opening message too long",
            pb::HandoffConfig {
                apple_body: "x".repeat(501),
                ..base()
            },
            "config.apple_body",
        ),
    ];
    for (case, config, field) in cases {
        let refused = client
            .create_handoff_config(authed(
                pb::CreateHandoffConfigRequest {
                    account_id: "acme".into(),
                    config: Some(config),
                },
                &admin,
            ))
            .await
            .expect_err(case);
        assert_eq!(refused.code(), Code::InvalidArgument, "{case}");
        let fields: Vec<String> = refused
            .get_details_bad_request()
            .expect("BadRequest details")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, [field], "{case}");
    }
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_in_use_cannot_be_deleted_and_every_change_is_audited() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let admin = token(AuthRole::Admin, Some("acme"));
    let service = TokenKey::new(SECRET.as_bytes()).service_token("channel-gateway");
    let mut client = story.config().await;
    let template = client
        .create_whats_app_template(authed(
            pb::CreateWhatsAppTemplateRequest {
                account_id: "acme".into(),
                template: Some(pb::WhatsAppTemplate {
                    template_id: "followup".into(),
                    name: "billing_followup".into(),
                    language: "en_US".into(),
                    category: pb::WhatsAppTemplateCategory::Utility as i32,
                    body: "Hi {{1}}, reply here about your bill.".into(),
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("template")
        .into_inner()
        .template
        .expect("template");
    // Meta approves it (the gateway relays the template-status webhook).
    client
        .update_whats_app_template_status(authed(
            pb::UpdateWhatsAppTemplateStatusRequest {
                account_id: "acme".into(),
                template_id: template.template_id.clone(),
                status: pb::WhatsAppTemplateStatus::Approved as i32,
                ..Default::default()
            },
            &service,
        ))
        .await
        .expect("approved");
    client
        .create_handoff_config(authed(
            pb::CreateHandoffConfigRequest {
                account_id: "acme".into(),
                config: Some(pb::HandoffConfig {
                    channel_priority: vec![Channel::Whatsapp as i32, Channel::Sms as i32],
                    whatsapp_template_id: "followup".into(),
                    ..sms_config("whatsapp-first", "billing-agents")
                }),
            },
            &admin,
        ))
        .await
        .expect("a configuration using the template");

    let refused = client
        .delete_whats_app_template(authed(
            pb::DeleteWhatsAppTemplateRequest {
                account_id: "acme".into(),
                template_id: "followup".into(),
            },
            &admin,
        ))
        .await
        .expect_err("in use");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("whatsapp-first"), "{refused:?}");

    client
        .delete_handoff_config(authed(
            pb::DeleteHandoffConfigRequest {
                account_id: "acme".into(),
                handoff_config_id: "whatsapp-first".into(),
            },
            &admin,
        ))
        .await
        .expect("config deleted");
    client
        .delete_whats_app_template(authed(
            pb::DeleteWhatsAppTemplateRequest {
                account_id: "acme".into(),
                template_id: "followup".into(),
            },
            &admin,
        ))
        .await
        .expect("no longer in use");

    // The audit log, oldest first, paged two at a time.
    let mut actions = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_audit_events(authed(
                pb::ListAuditEventsRequest {
                    account_id: "acme".into(),
                    page_size: 2,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .expect("audit")
            .into_inner();
        actions.extend(page.events.iter().map(|e| {
            (
                e.action.clone(),
                e.actor.clone(),
                e.before_json.is_empty(),
                e.after_json.is_empty(),
            )
        }));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let names: Vec<&str> = actions.iter().map(|(a, ..)| a.as_str()).collect();
    assert_eq!(
        names,
        [
            "CreateAccount",
            "UpdateAccountSettings",
            "CreateApiKey",
            "CreateHandoffConfig",
            "CreateWhatsAppTemplate",
            "UpdateWhatsAppTemplateStatus",
            "CreateHandoffConfig",
            "DeleteHandoffConfig",
            "DeleteWhatsAppTemplate",
        ]
    );
    // Who: the token's subject; before and after as they apply.
    assert!(actions.iter().all(|(_, actor, ..)| !actor.is_empty()));
    let delete = actions
        .iter()
        .find(|(a, ..)| a == "DeleteHandoffConfig")
        .expect("delete");
    assert_eq!(
        (delete.2, delete.3),
        (false, true),
        "a deletion has a before and no after"
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurations_list_by_page_and_filter() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let editor = token(AuthRole::Editor, Some("acme"));
    let mut client = story.config().await;
    for i in 0..5 {
        let skill = if i % 2 == 0 { "sales" } else { "support" };
        client
            .create_handoff_config(authed(
                pb::CreateHandoffConfigRequest {
                    account_id: "acme".into(),
                    config: Some(sms_config(&format!("cfg-{i}"), skill)),
                },
                &editor,
            ))
            .await
            .expect("created");
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_handoff_configs(authed(
                pb::ListHandoffConfigsRequest {
                    account_id: "acme".into(),
                    page_size: 2,
                    page_token: page_token.clone(),
                    skill_id: "sales".into(),
                    ..Default::default()
                },
                &editor,
            ))
            .await
            .expect("page")
            .into_inner();
        assert!(page.configs.len() <= 2);
        seen.extend(page.configs.into_iter().map(|c| c.handoff_config_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, ["cfg-0", "cfg-2", "cfg-4"]);
    let all = client
        .list_handoff_configs(authed(
            pb::ListHandoffConfigsRequest {
                account_id: "acme".into(),
                channel: Channel::Sms as i32,
                ..Default::default()
            },
            &editor,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.configs.len(), 6, "five and onboarding's billing");
    let bad = client
        .list_handoff_configs(authed(
            pb::ListHandoffConfigsRequest {
                account_id: "acme".into(),
                page_token: "!!".into(),
                ..Default::default()
            },
            &editor,
        ))
        .await
        .expect_err("a forged token");
    assert_eq!(bad.code(), Code::InvalidArgument);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_sees_a_configuration_change_well_inside_its_cache_ttl() {
    use crate::story::handoff_request;

    let story = Story::start(Topology::Separate).await;
    let key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;
    // Handoff reads the account (deflection on) and caches it.
    handoff
        .create_handoff(authed(handoff_request("acme", "+14155550301", "w-1"), &key))
        .await
        .expect("sent");

    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: false,
                ..Default::default()
            },
        )
        .await;
    let changed = std::time::Instant::now();
    // The cache's TTL is 5 s: seeing the change within 2 s is the change notice at work.
    let mut n = 1;
    c2m_test_support::eventually(
        "handoff to see deflection switched off",
        std::time::Duration::from_secs(2),
        || {
            n += 1;
            let mut handoff = handoff.clone();
            let request = handoff_request(
                "acme",
                &format!("+1415555{:04}", 400 + n),
                &format!("w-{n}"),
            );
            let key = key.clone();
            async move {
                handoff
                    .create_handoff(authed(request, &key))
                    .await
                    .is_err_and(|s| s.code() == Code::FailedPrecondition)
            }
        },
    )
    .await;
    eprintln!(
        "configuration change visible to handoff after {:?}",
        changed.elapsed()
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reporting_rpc_checks_account_and_role() {
    use c2m_proto::v1::reporting_service_client::ReportingServiceClient;

    let story = Story::start(Topology::Dev).await;
    let mut client: ReportingServiceClient<GrpcChannel> = story.reporting().await;
    let now = chrono::Utc::now();
    let period = || {
        (
            Some(c2m_proto::timestamp(now - chrono::Duration::hours(1))),
            Some(c2m_proto::timestamp(now)),
        )
    };
    let mut wrong = Vec::new();
    for caller in CALLERS {
        let (start_time, end_time) = period();
        let funnel = client
            .get_funnel(request(
                pb::GetFunnelRequest {
                    account_id: "acme".into(),
                    start_time,
                    end_time,
                    group_by: 0,
                },
                caller,
            ))
            .await
            .err()
            .map(|s| s.code());
        let (start_time, end_time) = period();
        let transactions = client
            .list_transactions(request(
                pb::ListTransactionsRequest {
                    account_id: "acme".into(),
                    start_time,
                    end_time,
                    ..Default::default()
                },
                caller,
            ))
            .await
            .err()
            .map(|s| s.code());
        let record = client
            .record_events(request(pb::RecordEventsRequest { events: vec![] }, caller))
            .await
            .err()
            .map(|s| s.code());
        let refusal = |needs: Needs| match caller {
            Caller::Nobody => Some(Code::Unauthenticated),
            c if !allowed(needs, c) => Some(Code::PermissionDenied),
            _ => None,
        };
        for (rpc, got, needs) in [
            ("GetFunnel", funnel, Needs::AtLeast(AuthRole::Viewer)),
            (
                "ListTransactions",
                transactions,
                Needs::AtLeast(AuthRole::Viewer),
            ),
            ("RecordEvents", record, Needs::Internal),
        ] {
            if got != refusal(needs) {
                wrong.push(format!(
                    "{rpc} as {caller:?}: {got:?}, expected {:?}",
                    refusal(needs)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    story.stop().await;
}
