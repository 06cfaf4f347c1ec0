//! A bot that answers deflected conversations: the smallest useful client of c2m's agent API.
//!
//! It follows `WatchConversations` (resuming from the last cursor it saw after a dropped
//! connection), claims each conversation that opens on its skills, greets the caller by the name
//! the IVR passed, answers `hours` and `agent`, and closes the conversation when the consumer says
//! `bye`. Every answer carries a client message id made from the event's cursor, so a retry after
//! a lost answer never texts the consumer twice.
//!
//! ```sh
//! TOKEN=$(c2m token --role agent --account acme --subject bot:faq --skill billing-agents)
//! C2M_URL=http://127.0.0.1:50051 C2M_ACCOUNT=acme C2M_TOKEN=$TOKEN \
//!     cargo run --example answering_bot
//! ```

use std::time::Duration;

use c2m_proto::v1::{
    self as pb, conversation_event::Kind, conversation_service_client::ConversationServiceClient,
};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

/// What the bot needs to act for one account.
struct Bot {
    client: ConversationServiceClient<Channel>,
    account_id: String,
    token: MetadataValue<tonic::metadata::Ascii>,
}

impl Bot {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.token.clone());
        request
    }

    /// Answers `text` in `conversation_id`, under an id made from the event it answers.
    async fn say(&mut self, conversation_id: &str, cursor: &str, text: &str) -> anyhow::Result<()> {
        let request = self.request(pb::SendConversationMessageRequest {
            account_id: self.account_id.clone(),
            conversation_id: conversation_id.to_owned(),
            client_message_id: format!("bot-{}", &cursor[..cursor.len().min(60)]),
            text: text.to_owned(),
            ..Default::default()
        });
        let entry = self
            .client
            .send_conversation_message(request)
            .await?
            .into_inner();
        let stage = entry.entry.map(|e| e.stage).unwrap_or_default();
        println!(
            "answered {conversation_id}: {text:?} ({:?})",
            pb::FunnelStage::try_from(stage)
        );
        Ok(())
    }

    async fn handle(&mut self, event: pb::ConversationEvent) -> anyhow::Result<()> {
        let id = event.conversation_id.clone();
        match event.kind {
            Some(Kind::Opened(conversation)) => {
                let claim = self.request(pb::AssignConversationRequest {
                    account_id: self.account_id.clone(),
                    conversation_id: id.clone(),
                    ..Default::default()
                });
                if let Err(status) = self.client.assign_conversation(claim).await {
                    // Another agent or bot has it.
                    println!("not mine: {id}: {}", status.message());
                    return Ok(());
                }
                let name = conversation
                    .engagement_attributes
                    .and_then(|a| a.personal_info)
                    .map(|p| p.first_name)
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "there".to_owned());
                let hello = format!(
                    "Hi {name}, thanks for texting us instead of waiting. Ask about our hours, \
                     reply AGENT for a person, or BYE when you are done."
                );
                self.say(&id, &event.cursor, &hello).await
            }
            Some(Kind::Message(entry))
                if entry.direction == pb::TranscriptDirection::Inbound as i32 =>
            {
                match entry.text.trim().to_lowercase().as_str() {
                    "bye" => {
                        self.say(&id, &event.cursor, "Thanks, goodbye!").await?;
                        let close = self.request(pb::CloseConversationRequest {
                            account_id: self.account_id.clone(),
                            conversation_id: id.clone(),
                            reason: "resolved by bot".into(),
                        });
                        self.client.close_conversation(close).await?;
                        Ok(())
                    }
                    "agent" => {
                        let release = self.request(pb::ReleaseConversationRequest {
                            account_id: self.account_id.clone(),
                            conversation_id: id.clone(),
                        });
                        self.client.release_conversation(release).await?;
                        self.say(&id, &event.cursor, "Passing you to a person now.")
                            .await
                    }
                    text if text.contains("hours") => {
                        self.say(&id, &event.cursor, "We are open 8am to 8pm, every day.")
                            .await
                    }
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).map_err(|_| anyhow::anyhow!("set {name}"));
    let channel = Channel::from_shared(var("C2M_URL")?)?.connect_lazy();
    let mut bot = Bot {
        client: ConversationServiceClient::new(channel),
        account_id: var("C2M_ACCOUNT")?,
        token: format!("Bearer {}", var("C2M_TOKEN")?).parse()?,
    };
    let mut cursor = String::new();
    loop {
        let watch = bot.request(pb::WatchConversationsRequest {
            account_id: bot.account_id.clone(),
            cursor: cursor.clone(),
            ..Default::default()
        });
        match bot.client.watch_conversations(watch).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                println!("watching {} from {:?}", bot.account_id, cursor);
                while let Ok(Some(item)) = stream.message().await {
                    let Some(event) = item.event else { continue };
                    let at = event.cursor.clone();
                    if let Err(error) = bot.handle(event).await {
                        eprintln!("could not handle an event: {error}");
                    }
                    cursor = at;
                }
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                anyhow::bail!("not allowed: {}", status.message())
            }
            Err(status) => eprintln!("stream unavailable ({}); retrying", status.message()),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
