//! The `c2m.v1.ChannelGatewayService` RPCs.

use c2m_proto::v1::{
    self as pb, Channel, FunnelStage, Provider,
    channel_gateway_service_server::ChannelGatewayService,
    put_provider_credentials_request::Credentials,
};
use c2m_runtime::{auth::Role, is_e164, mask_phone, status::FieldViolations};
use chrono::Utc;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::{
    Service, credentials, lookup,
    messages::{self, Outbound},
    meta, sandbox,
    twilio::{self, SendOutcome},
};

fn db_status(error: sqlx::Error) -> Status {
    c2m_storage::postgres::db_status("gateway", error)
}

fn no_credentials(error: credentials::CredentialsError) -> SendOutcome {
    SendOutcome::Failed {
        code: "no-credentials".into(),
        message: error.to_string(),
    }
}

fn validate_twilio(t: &pb::TwilioCredentials, v: &mut FieldViolations) {
    if !(t.account_sid.starts_with("AC") && t.account_sid.len() == 34) {
        v.add(
            "twilio.account_sid",
            "an Account SID: AC and 32 hex characters",
        );
    }
    if t.auth_token.is_empty() {
        v.add("twilio.auth_token", "required");
    }
    match (t.from_number.is_empty(), t.messaging_service_sid.is_empty()) {
        (true, true) => v.add(
            "twilio.from_number",
            "one of from_number or messaging_service_sid is required",
        ),
        (false, false) => v.add(
            "twilio.messaging_service_sid",
            "give from_number or messaging_service_sid, not both",
        ),
        (false, true) if !is_e164(&t.from_number) => {
            v.add("twilio.from_number", "an E.164 number, e.g. +14155550100")
        }
        (true, false) if !t.messaging_service_sid.starts_with("MG") => v.add(
            "twilio.messaging_service_sid",
            "a Messaging Service SID starts with MG",
        ),
        _ => {}
    }
}

impl Service {
    async fn send_sms(&self, r: &pb::SendMessageRequest) -> Result<SendOutcome, Status> {
        let creds = match self
            .credentials::<pb::TwilioCredentials>(&r.account_id, Provider::Twilio)
            .await
        {
            Ok(creds) => creds,
            Err(credentials::CredentialsError::Db(e)) => return Err(db_status(e)),
            Err(credentials::CredentialsError::Missing(_)) => return self.send_to_sandbox(r).await,
            Err(e) => return Ok(no_credentials(e)),
        };
        let callback = format!(
            "{}/webhooks/twilio/{}/status",
            self.settings.public_url.trim_end_matches('/'),
            r.account_id
        );
        Ok(twilio::send_sms(
            &self.http,
            &self.settings.twilio_api_base,
            &creds,
            &r.to,
            &r.text,
            &callback,
        )
        .await)
    }

    /// Accounts without Twilio credentials but with the sandbox send there.
    async fn send_to_sandbox(&self, r: &pb::SendMessageRequest) -> Result<SendOutcome, Status> {
        let options = match self
            .credentials::<pb::SandboxCredentials>(&r.account_id, Provider::Sandbox)
            .await
        {
            Ok(options) => options,
            Err(credentials::CredentialsError::Db(e)) => return Err(db_status(e)),
            Err(e) => return Ok(no_credentials(e)),
        };
        let sid = format!(
            "SM{}",
            r.message_id
                .replace('-', "")
                .chars()
                .rev()
                .take(32)
                .collect::<String>()
        );
        sandbox::simulate(
            self.http.clone(),
            sandbox::Simulation {
                public_url: self.settings.public_url.clone(),
                account_id: r.account_id.clone(),
                auth_token: sandbox::auth_token(&self.settings.credentials_key, &r.account_id),
                message_sid: sid.clone(),
                to: r.to.clone(),
                options,
            },
        );
        Ok(SendOutcome::Accepted { sid })
    }

    async fn send_whatsapp(&self, r: &pb::SendMessageRequest) -> Result<SendOutcome, Status> {
        let creds = match self
            .credentials::<pb::MetaWhatsAppCredentials>(&r.account_id, Provider::MetaWhatsapp)
            .await
        {
            Ok(creds) => creds,
            Err(credentials::CredentialsError::Db(e)) => return Err(db_status(e)),
            Err(e) => return Ok(no_credentials(e)),
        };
        Ok(meta::send(
            &self.http,
            &self.settings.meta_api_base,
            &self.settings.meta_api_version,
            &creds,
            &r.to,
            &r.text,
            r.whatsapp_template.as_ref(),
        )
        .await)
    }

    /// An account's credentials for a provider, opened and cached briefly: the send path does
    /// not read and decrypt them for every message.
    pub(crate) async fn credentials<T: Message + Default>(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<T, credentials::CredentialsError> {
        let key = (account_id.to_owned(), provider as i32);
        let plaintext = match self.credentials.get(&key) {
            Some(plaintext) => plaintext,
            None => {
                let opened =
                    credentials::open(self.db.pool(), &self.sealer, account_id, provider).await?;
                self.credentials.insert(key, opened.clone());
                opened
            }
        };
        T::decode(plaintext.as_slice()).map_err(|_| credentials::CredentialsError::Sealed)
    }
}

#[tonic::async_trait]
impl ChannelGatewayService for Service {
    async fn put_provider_credentials(
        &self,
        request: Request<pb::PutProviderCredentialsRequest>,
    ) -> Result<Response<pb::PutProviderCredentialsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Admin)?;
        let mut violations = FieldViolations::new();
        let (provider, plaintext) = match &r.credentials {
            Some(Credentials::Twilio(t)) => {
                validate_twilio(t, &mut violations);
                (Provider::Twilio, t.encode_to_vec())
            }
            Some(Credentials::MetaWhatsapp(m)) => {
                if m.phone_number_id.is_empty()
                    || !m.phone_number_id.bytes().all(|b| b.is_ascii_digit())
                {
                    violations.add(
                        "meta_whatsapp.phone_number_id",
                        "the numeric phone number id",
                    );
                }
                for (field, value) in [
                    ("meta_whatsapp.access_token", &m.access_token),
                    ("meta_whatsapp.app_secret", &m.app_secret),
                    ("meta_whatsapp.verify_token", &m.verify_token),
                ] {
                    if value.is_empty() {
                        violations.add(field, "required");
                    }
                }
                (Provider::MetaWhatsapp, m.encode_to_vec())
            }
            Some(Credentials::Sandbox(sandbox)) => (Provider::Sandbox, sandbox.encode_to_vec()),
            Some(_) => {
                return Err(Status::unimplemented(
                    "only twilio, meta_whatsapp and sandbox credentials are supported so far",
                ));
            }
            None => {
                violations.add("credentials", "required");
                (Provider::Unspecified, Vec::new())
            }
        };
        if r.provider != Provider::Unspecified as i32 && r.provider != provider as i32 {
            violations.add("provider", "does not match the credentials given");
        }
        violations.into_result()?;
        credentials::put(
            self.db.pool(),
            &self.sealer,
            &r.account_id,
            provider,
            &plaintext,
        )
        .await
        .map_err(db_status)?;
        tracing::info!(account_id = %r.account_id, provider = provider.as_str_name(), "provider credentials stored");
        Ok(Response::new(pb::PutProviderCredentialsResponse {}))
    }

    async fn delete_provider_credentials(
        &self,
        request: Request<pb::DeleteProviderCredentialsRequest>,
    ) -> Result<Response<pb::DeleteProviderCredentialsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Admin)?;
        let provider = Provider::try_from(r.provider)
            .ok()
            .filter(|p| *p != Provider::Unspecified)
            .ok_or_else(|| {
                c2m_runtime::status::invalid_field("provider", "a provider is required")
            })?;
        let deleted = credentials::delete(self.db.pool(), &r.account_id, provider)
            .await
            .map_err(db_status)?;
        self.credentials
            .remove(&(r.account_id.clone(), provider as i32));
        if !deleted {
            return Err(Status::not_found("no such credentials"));
        }
        Ok(Response::new(pb::DeleteProviderCredentialsResponse {}))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let r = request.into_inner();
        let mut violations = FieldViolations::new();
        if r.account_id.is_empty() {
            violations.add("account_id", "required");
        }
        if r.message_id.is_empty() || r.message_id.len() > 128 {
            violations.add("message_id", "required, at most 128 characters");
        }
        let channel = Channel::try_from(r.channel).unwrap_or_default();
        if channel == Channel::Unspecified {
            violations.add("channel", "a channel is required");
        }
        if !is_e164(&r.to) {
            violations.add("to", "an E.164 number");
        }
        if r.text.trim().is_empty() {
            violations.add("text", "required");
        }
        violations.into_result()?;

        if let Some(existing) = messages::get(self.db.pool(), &r.account_id, &r.message_id)
            .await
            .map_err(db_status)?
        {
            return Ok(Response::new(pb::SendMessageResponse {
                message: Some(existing.to_wire()),
            }));
        }
        let outcome = match channel {
            Channel::Sms => self.send_sms(&r).await?,
            Channel::Whatsapp => self.send_whatsapp(&r).await?,
            other => {
                return Err(Status::unimplemented(format!(
                    "{} is not supported yet",
                    other.as_str_name()
                )));
            }
        };
        // Twilio 21610: the recipient replied STOP to this sender; do not try them here again.
        if let SendOutcome::Failed { code, .. } = &outcome
            && channel == Channel::Sms
            && code == "21610"
            && let Err(status) = self
                .peers
                .routing()
                .record_opt_out(pb::RecordOptOutRequest {
                    account_id: r.account_id.clone(),
                    consumer_phone: r.to.clone(),
                    channel: Channel::Sms as i32,
                    source: "twilio:21610".into(),
                })
                .await
        {
            tracing::warn!(%status, "opt-out from twilio 21610 not recorded");
        }
        let now = Utc::now();
        let (stage, provider_id, error_code, error_message) = match outcome {
            SendOutcome::Accepted { sid } => (FunnelStage::Sent, Some(sid), None, None),
            SendOutcome::Failed { code, message } => {
                (FunnelStage::Failed, None, Some(code), Some(message))
            }
        };
        let message = messages::record(
            self.db.pool(),
            &Outbound {
                message_id: r.message_id,
                account_id: r.account_id,
                channel,
                handoff_id: r.handoff_id,
                handoff_config_id: r.handoff_config_id,
                skill_id: r.skill_id,
                provider_message_id: provider_id,
                stage,
                error_code,
                error_message,
                sent_at: now,
                updated_at: now,
            },
        )
        .await
        .map_err(db_status)?;
        tracing::info!(
            account_id = %message.account_id,
            message_id = %message.message_id,
            channel = channel.as_str_name(),
            to = %mask_phone(&r.to),
            stage = message.stage.as_str_name(),
            error_code = message.error_code.as_deref().unwrap_or(""),
            "message sent"
        );
        Ok(Response::new(pb::SendMessageResponse {
            message: Some(message.to_wire()),
        }))
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        let message = messages::get(self.db.pool(), &r.account_id, &r.message_id)
            .await
            .map_err(db_status)?
            .ok_or_else(|| Status::not_found(format!("message {} not found", r.message_id)))?;
        Ok(Response::new(pb::GetMessageResponse {
            message: Some(message.to_wire()),
        }))
    }

    async fn lookup_number(
        &self,
        request: Request<pb::LookupNumberRequest>,
    ) -> Result<Response<pb::LookupNumberResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        if !is_e164(&r.phone) {
            return Err(c2m_runtime::status::invalid_field(
                "phone",
                "an E.164 number",
            ));
        }
        let answer = |line_type: pb::LineType, source: pb::LookupSource| {
            Ok(Response::new(pb::LookupNumberResponse {
                line_type: line_type as i32,
                source: source as i32,
            }))
        };
        if let Some(kind) = lookup::from_numbering_plan(&r.phone) {
            return answer(kind, pb::LookupSource::NumberingPlan);
        }
        if let Some(kind) = lookup::cached(self.db.pool(), &r.phone)
            .await
            .map_err(db_status)?
        {
            return answer(kind, pb::LookupSource::Cache);
        }
        let creds = match self
            .credentials::<pb::TwilioCredentials>(&r.account_id, Provider::Twilio)
            .await
        {
            Ok(creds) => creds,
            Err(credentials::CredentialsError::Db(e)) => return Err(db_status(e)),
            Err(_) => return answer(pb::LineType::Unknown, pb::LookupSource::Unspecified),
        };
        match lookup::twilio(
            &self.http,
            &self.settings.twilio_lookup_base,
            &creds,
            &r.phone,
        )
        .await
        {
            Ok(kind) => {
                lookup::remember(self.db.pool(), &r.phone, kind)
                    .await
                    .map_err(db_status)?;
                answer(kind, pb::LookupSource::Provider)
            }
            Err(error) => {
                // Unknown rather than an error: a failed lookup must not keep a caller from
                // being deflected.
                tracing::warn!(account_id = %r.account_id, phone = %mask_phone(&r.phone), %error, "number lookup failed");
                answer(pb::LineType::Unknown, pb::LookupSource::Unspecified)
            }
        }
    }
}
