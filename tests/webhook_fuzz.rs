//! Webhook parsers (Twilio, Meta, Google RBM) against arbitrary bytes: whatever arrives, correctly signed or not, the answer is
//! a 2xx or a 4xx — never a 5xx, never a hang, never a panic.

use base64::{Engine, engine::general_purpose::STANDARD};
use c2m_proto::v1::{self as pb, put_provider_credentials_request::Credentials};
use c2m_test_support::{goog_signature, meta_signature, twilio_signature};

use crate::story::{Story, TWILIO_TOKEN, Topology, onboard};

/// A small deterministic generator (SplitMix64): random inputs, reproducible failures.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Bytes of a random kind: noise, near-JSON, near-form.
    fn body(&mut self) -> Vec<u8> {
        let len = (self.next() % 300) as usize;
        match self.next() % 4 {
            0 => (0..len).map(|_| self.next() as u8).collect(),
            1 => {
                let pieces = ["{", "}", "[", "]", "\"entry\"", ":", ",", "\"changes\"", "\"value\"", "\"statuses\"", "null", "1e999", "\"id\"", "\"\\u0000\""];
                (0..len / 4).flat_map(|_| pieces[(self.next() % pieces.len() as u64) as usize].bytes()).collect()
            }
            2 => {
                let pieces = ["MessageSid=", "&", "=", "%", "%ZZ", "From=%2B1", "Body=", "MessageStatus=delivered", "+", "\u{fffd}"];
                (0..len / 4).flat_map(|_| pieces[(self.next() % pieces.len() as u64) as usize].bytes()).collect()
            }
            _ => br#"{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":{"statuses":[{"id":7,"status":[]}],"messages":[{"from":null}]}}]}]}"#.to_vec(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_answer_arbitrary_bytes_with_2xx_or_4xx() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    story
        .put_credentials(
            "acme",
            Credentials::MetaWhatsapp(pb::MetaWhatsAppCredentials {
                phone_number_id: "1065".into(),
                access_token: "t".into(),
                app_secret: "s".into(),
                verify_token: "v".into(),
            }),
        )
        .await;
    story
        .put_credentials(
            "acme",
            Credentials::GoogleRbm(pb::GoogleRbmCredentials {
                agent_id: "agent".into(),
                service_account_json: story
                    .google
                    .service_account("rbm@acme.iam.gserviceaccount.com"),
                client_token: "ct".into(),
            }),
        )
        .await;
    let http = reqwest::Client::new();
    let twilio_status = format!("{}/webhooks/twilio/acme/status", story.webhooks);
    let twilio_inbound = format!("{}/webhooks/twilio/acme/inbound", story.webhooks);
    let meta = format!("{}/webhooks/meta/acme", story.webhooks);
    let google = format!("{}/webhooks/google/acme", story.webhooks);
    let mut rng = Rng(20261126);
    let mut bad = Vec::new();
    for i in 0..400 {
        let mut body = rng.body();
        let signed = rng.next().is_multiple_of(2);
        let (url, header, signature) = match i % 4 {
            0 | 1 => {
                let url = if i % 4 == 0 {
                    &twilio_status
                } else {
                    &twilio_inbound
                };
                // Sign what a form parser would read, when the bytes parse as a form at all.
                let params: Vec<(String, String)> =
                    serde_urlencoded::from_bytes(&body).unwrap_or_default();
                let pairs: Vec<(&str, &str)> = params
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let signature = if signed {
                    twilio_signature(TWILIO_TOKEN, url, &pairs)
                } else {
                    "AAAA".into()
                };
                (url, "X-Twilio-Signature", signature)
            }
            2 => {
                let signature = if signed {
                    meta_signature("s", &body)
                } else {
                    "sha256=00".into()
                };
                (&meta, "X-Hub-Signature-256", signature)
            }
            _ => {
                // RBM signs the decoded `message.data`: signed bytes go inside an envelope;
                // unsigned ones arrive bare, as a handshake would.
                if signed {
                    let signature = goog_signature("ct", &body);
                    body = serde_json::to_vec(&serde_json::json!({
                        "message": { "data": STANDARD.encode(&body) }
                    }))
                    .expect("json");
                    (&google, "X-Goog-Signature", signature)
                } else {
                    (&google, "X-Unsigned", String::new())
                }
            }
        };
        let status = http
            .post(url.as_str())
            .header(header, signature)
            .header(
                "content-type",
                if i % 4 >= 2 {
                    "application/json"
                } else {
                    "application/x-www-form-urlencoded"
                },
            )
            .body(body.clone())
            .send()
            .await
            .expect("answered")
            .status();
        if !(status.is_success() || status.is_client_error()) {
            bad.push(format!(
                "#{i} {url} signed={signed}: {status} for {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
    story.stop().await;
}
