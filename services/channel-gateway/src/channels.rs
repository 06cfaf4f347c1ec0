//! Sending on each channel: the account's credentials for the provider, then the provider's API.
//! A provider's refusal is an outcome (recorded on the message, and the handoff falls back); only
//! our own storage failing is an error.

use c2m_proto::v1::{self as pb, DevicePlatform, Provider};
use prost::Message;
use tonic::Status;

use crate::{
    Service, credentials, db_status, google, meta,
    outcome::{Refusal, SendOutcome},
    push, rbm,
    sandbox::{self, Player},
    twilio, window,
};

/// What RBM says of a number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Capability {
    Capable,
    NotReachable,
    NoCredentials,
    /// RBM did not answer; the send itself will tell (and the handoff falls back).
    Unknown(String),
}

/// An account's credentials for one provider, as a send needs them.
enum Creds<T> {
    Found(T),
    /// None stored: the sandbox may play the provider, if the account has it.
    Missing(Refusal),
    /// Stored but not usable (sealed under another key, or refused by the provider).
    Unusable(Refusal),
}

fn refused(error: credentials::CredentialsError) -> Refusal {
    Refusal::new("no-credentials", error.to_string())
}

impl Service {
    /// Sends `r` on `channel`.
    pub(crate) async fn send_on(
        &self,
        channel: pb::Channel,
        r: &pb::SendMessageRequest,
    ) -> Result<SendOutcome, Status> {
        match channel {
            pb::Channel::Sms => self.send_sms(r, &r.text).await,
            pb::Channel::Whatsapp => self.send_whatsapp(r).await,
            pb::Channel::Rcs => self.send_rcs(r).await,
            pb::Channel::AppleMessages => self.send_apple_invite(r).await,
            pb::Channel::AppMessaging => self.send_push(r).await,
            pb::Channel::Unspecified => Err(Status::invalid_argument("a channel is required")),
        }
    }

    async fn send_sms(
        &self,
        r: &pb::SendMessageRequest,
        text: &str,
    ) -> Result<SendOutcome, Status> {
        let creds = match self
            .provider::<pb::TwilioCredentials>(&r.account_id, Provider::Twilio)
            .await?
        {
            Creds::Found(creds) => creds,
            Creds::Missing(refusal) => return self.sandbox(r, Player::Twilio, refusal).await,
            Creds::Unusable(refusal) => return Ok(refusal.into()),
        };
        // Our message id in the callback's URL: Twilio's callbacks find the message even when
        // Twilio's answer to the send, and with it the SID, was lost.
        let callback = format!(
            "{}/webhooks/twilio/{}/status?{}",
            self.settings.public_url.trim_end_matches('/'),
            r.account_id,
            serde_urlencoded::to_string([("message_id", &r.message_id)])
                .expect("a pair of strings encodes"),
        );
        Ok(twilio::send_sms(
            &self.http,
            &self.settings.twilio_api_base,
            &creds,
            &r.to,
            text,
            &r.media_urls,
            &callback,
        )
        .await)
    }

    /// Accounts without `player`'s credentials but with the sandbox send there: it accepts the
    /// message and plays the provider and the consumer. Without the sandbox, `missing` stands.
    async fn sandbox(
        &self,
        r: &pb::SendMessageRequest,
        player: Player,
        missing: Refusal,
    ) -> Result<SendOutcome, Status> {
        let options = match self
            .provider::<pb::SandboxCredentials>(&r.account_id, Provider::Sandbox)
            .await?
        {
            Creds::Found(options) => options,
            Creds::Missing(_) => return Ok(missing.into()),
            Creds::Unusable(refusal) => return Ok(refusal.into()),
        };
        let id = player.message_id(&r.message_id);
        player.simulate(
            self.http.clone(),
            sandbox::Simulation {
                public_url: self.settings.public_url.clone(),
                account_id: r.account_id.clone(),
                auth_token: player.secret(&self.settings.credentials_key, &r.account_id),
                message_sid: id.clone(),
                to: r.to.clone(),
                options,
            },
        );
        Ok(SendOutcome::Accepted { sid: id })
    }

    async fn send_whatsapp(&self, r: &pb::SendMessageRequest) -> Result<SendOutcome, Status> {
        // Free-form text only inside the customer-service window: Meta would refuse it (131047),
        // and refusing here spares the call.
        if r.whatsapp_template.is_none()
            && window::closes_at(&*self.store, &r.account_id, &r.to)
                .await
                .map_err(db_status)?
                .is_none()
        {
            return Ok(SendOutcome::Failed {
                code: "outside-customer-service-window".into(),
                message: "free-form WhatsApp text needs a message from the consumer in the last 24 hours; send a template".into(),
            });
        }
        let creds = match self
            .provider::<pb::MetaWhatsAppCredentials>(&r.account_id, Provider::MetaWhatsapp)
            .await?
        {
            Creds::Found(creds) => creds,
            Creds::Missing(refusal) => return self.sandbox(r, Player::Meta, refusal).await,
            Creds::Unusable(refusal) => return Ok(refusal.into()),
        };
        Ok(meta::send(
            &self.http,
            &self.settings.meta_api_base,
            &self.settings.meta_api_version,
            &creds,
            (&r.message_id, &r.to),
            meta::Content::of(&r.text, r.whatsapp_template.as_ref(), &r.media_urls),
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
                    credentials::open(&*self.store, &self.sealer, account_id, provider).await?;
                self.credentials.insert(key, opened.clone());
                opened
            }
        };
        T::decode(plaintext.as_slice()).map_err(|_| credentials::CredentialsError::Sealed)
    }

    /// Whether the account tries things out in the sandbox.
    pub(crate) async fn has_sandbox(&self, account_id: &str) -> Result<bool, Status> {
        match self
            .credentials::<pb::SandboxCredentials>(account_id, Provider::Sandbox)
            .await
        {
            Ok(_) => Ok(true),
            Err(credentials::CredentialsError::Db(e)) => Err(db_status(e)),
            Err(_) => Ok(false),
        }
    }

    /// The account's credentials for `provider`; only our own storage failing is an error.
    async fn provider<T: Message + Default>(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<Creds<T>, Status> {
        match self.credentials::<T>(account_id, provider).await {
            Ok(creds) => Ok(Creds::Found(creds)),
            Err(credentials::CredentialsError::Db(e)) => Err(db_status(e)),
            Err(e @ credentials::CredentialsError::Missing(_)) => Ok(Creds::Missing(refused(e))),
            Err(e) => Ok(Creds::Unusable(refused(e))),
        }
    }

    /// The account's RBM agent with an access token for it.
    async fn rbm_token(
        &self,
        account_id: &str,
    ) -> Result<Creds<(pb::GoogleRbmCredentials, String)>, Status> {
        Ok(
            match self
                .provider::<pb::GoogleRbmCredentials>(account_id, Provider::GoogleRbm)
                .await?
            {
                Creds::Found(creds) => match self
                    .google
                    .token(&self.http, &creds.service_account_json, google::RBM_SCOPE)
                    .await
                {
                    Ok((_, token)) => Creds::Found((creds, token)),
                    Err(refusal) => Creds::Unusable(refusal),
                },
                Creds::Missing(refusal) => Creds::Missing(refusal),
                Creds::Unusable(refusal) => Creds::Unusable(refusal),
            },
        )
    }

    /// Whether the number can take RCS from the account's agent, asked of RBM and remembered
    /// for ten minutes (a capability check is a call of its own, and a caller is waiting).
    pub(crate) async fn rcs_capability(
        &self,
        account_id: &str,
        phone: &str,
    ) -> Result<Capability, Status> {
        let key = (account_id.to_owned(), phone.to_owned());
        if let Some(capable) = self.rcs_capability.get(&key) {
            return Ok(if capable {
                Capability::Capable
            } else {
                Capability::NotReachable
            });
        }
        let (creds, token) = match self.rbm_token(account_id).await? {
            Creds::Found(found) => found,
            // The sandbox reaches every number.
            Creds::Missing(_) if self.has_sandbox(account_id).await? => {
                return Ok(Capability::Capable);
            }
            Creds::Missing(_) => return Ok(Capability::NoCredentials),
            Creds::Unusable(refusal) => return Ok(Capability::Unknown(refusal.message)),
        };
        let answer = rbm::capable(
            &self.http,
            &self.settings.rbm_api_base,
            &token,
            &creds.agent_id,
            phone,
        )
        .await;
        Ok(match answer {
            Ok(capable) => {
                self.rcs_capability.insert(key, capable);
                if capable {
                    Capability::Capable
                } else {
                    Capability::NotReachable
                }
            }
            Err(why) => Capability::Unknown(why),
        })
    }

    async fn send_rcs(&self, r: &pb::SendMessageRequest) -> Result<SendOutcome, Status> {
        let (creds, token) = match self.rbm_token(&r.account_id).await? {
            Creds::Found(found) => found,
            Creds::Missing(refusal) => return self.sandbox(r, Player::Google, refusal).await,
            Creds::Unusable(refusal) => return Ok(refusal.into()),
        };
        let outcome = rbm::send(
            &self.http,
            &self.settings.rbm_api_base,
            &token,
            &creds.agent_id,
            &r.to,
            &r.message_id,
            &rbm::content(&r.text, &r.media_urls),
        )
        .await;
        match &outcome {
            SendOutcome::Failed { code, .. } if code == "not-rcs-reachable" => {
                self.rcs_capability
                    .insert((r.account_id.clone(), r.to.clone()), false);
            }
            SendOutcome::Failed { code, .. } if code == "UNAUTHENTICATED" => self
                .google
                .forget(&creds.service_account_json, google::RBM_SCOPE),
            _ => {}
        }
        Ok(outcome)
    }

    /// Apple Messages for Business starts from an SMS: the text, readable on any phone, and the
    /// link that opens the chat in Messages on an iPhone.
    async fn send_apple_invite(&self, r: &pb::SendMessageRequest) -> Result<SendOutcome, Status> {
        let Some(invite) = r.apple_messages_invite.as_ref() else {
            return Err(c2m_runtime::status::invalid_field(
                "apple_messages_invite",
                "required for CHANNEL_APPLE_MESSAGES",
            ));
        };
        let text = format!("{}\n{}", r.text.trim_end(), apple_link(invite));
        self.send_sms(r, &text).await
    }

    /// A push to every device the consumer registered; sent when any provider took it. Tokens
    /// the providers call invalid are forgotten.
    async fn send_push(&self, r: &pb::SendMessageRequest) -> Result<SendOutcome, Status> {
        let devices = self
            .store
            .devices(&r.account_id, &r.consumer_id)
            .await
            .map_err(db_status)?;
        if devices.is_empty() {
            return Ok(SendOutcome::Failed {
                code: "no-registered-device".into(),
                message: format!("consumer {} has no registered device", r.consumer_id),
            });
        }
        let notification = push::Notification {
            title: &r.push_title,
            body: &r.text,
            message_id: &r.message_id,
            handoff_id: &r.handoff_id,
        };
        let mut accepted = None;
        let mut unconfirmed = None;
        let mut last_failure = None;
        for device in &devices {
            let outcome = match device.platform {
                DevicePlatform::Ios => {
                    self.push_apns(&r.account_id, &device.token, &notification)
                        .await?
                }
                _ => {
                    self.push_fcm(&r.account_id, &device.token, &notification)
                        .await?
                }
            };
            match outcome {
                push::PushOutcome::Accepted(id) => {
                    accepted.get_or_insert(id);
                }
                push::PushOutcome::Unregistered => {
                    tracing::info!(account_id = %r.account_id, "push token no longer valid, forgotten");
                    self.store
                        .forget_device(&r.account_id, &device.token)
                        .await
                        .map_err(db_status)?;
                    last_failure = Some((
                        "unregistered".to_owned(),
                        "the device token is no longer valid".to_owned(),
                    ));
                }
                push::PushOutcome::Failed { code, message } => last_failure = Some((code, message)),
                push::PushOutcome::Unconfirmed { why } => {
                    unconfirmed.get_or_insert(why);
                }
            }
        }
        // One device that took it is a push sent; one that may have is a push that may have
        // reached the consumer, which a send on the next channel must not double.
        Ok(match (accepted, unconfirmed, last_failure) {
            (Some(sid), _, _) => SendOutcome::Accepted { sid },
            (None, Some(why), _) => SendOutcome::Unconfirmed { why },
            (None, None, Some((code, message))) => SendOutcome::Failed { code, message },
            (None, None, None) => unreachable!("at least one device was tried"),
        })
    }

    async fn push_fcm(
        &self,
        account_id: &str,
        device_token: &str,
        n: &push::Notification<'_>,
    ) -> Result<push::PushOutcome, Status> {
        let creds = match self
            .provider::<pb::FcmCredentials>(account_id, Provider::Fcm)
            .await?
        {
            Creds::Found(creds) => creds,
            Creds::Missing(refusal) | Creds::Unusable(refusal) => return Ok(refusal.into()),
        };
        let token = match self
            .google
            .token(&self.http, &creds.service_account_json, google::FCM_SCOPE)
            .await
        {
            Ok((_, token)) => token,
            Err(refusal) => return Ok(refusal.into()),
        };
        let outcome = push::fcm(
            &self.http,
            &self.settings.fcm_api_base,
            &creds.project_id,
            &token,
            device_token,
            n,
        )
        .await;
        if matches!(&outcome, push::PushOutcome::Failed { code, .. } if code == "UNAUTHENTICATED") {
            self.google
                .forget(&creds.service_account_json, google::FCM_SCOPE);
        }
        Ok(outcome)
    }

    async fn push_apns(
        &self,
        account_id: &str,
        device_token: &str,
        n: &push::Notification<'_>,
    ) -> Result<push::PushOutcome, Status> {
        let creds = match self
            .provider::<pb::ApnsCredentials>(account_id, Provider::Apns)
            .await?
        {
            Creds::Found(creds) => creds,
            Creds::Missing(refusal) | Creds::Unusable(refusal) => return Ok(refusal.into()),
        };
        let provider_token = match self.apns_tokens.token(&creds) {
            Ok(token) => token,
            Err(message) => return Ok(Refusal::new("bad-credentials", message).into()),
        };
        Ok(push::apns(
            &self.http2,
            &self.settings.apns_api_base,
            &creds,
            &provider_token,
            device_token,
            n,
        )
        .await)
    }
}

/// `https://bcrw.apple.com/urn:biz:{business id}` with the intent, group and opening message, when
/// configured.
pub fn apple_link(invite: &pb::AppleMessagesInvite) -> String {
    let mut link = format!("https://bcrw.apple.com/urn:biz:{}", invite.business_id);
    let query: Vec<(&str, &str)> = [
        ("biz-intent-id", invite.intent_id.as_str()),
        ("biz-group-id", invite.group_id.as_str()),
        ("body", invite.body.as_str()),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .collect();
    if !query.is_empty() {
        link.push('?');
        link.push_str(&serde_urlencoded::to_string(query).expect("pairs of strings encode"));
    }
    link
}
