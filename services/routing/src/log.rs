//! The conversation event log: every change to a conversation is written, in the transaction that
//! makes it, at the account's next position (no gaps, committed in order: see the migration), and
//! a notice (PostgreSQL's `NOTIFY`) wakes every routing replica. Each replica's [`Feed`] reads what is new
//! once per account and fans it out to its `WatchConversations` streams; a stream that falls
//! behind, or reconnects with a cursor, reads the log itself. So a client gets every event after
//! its cursor exactly once, from any replica, across restarts.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use c2m_proto::v1 as pb;
use futures::Stream;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::store::RoutingStore;

/// Events read from the log in one statement.
const PAGE: i64 = 500;
/// Events a replica holds for its streams; a stream further behind reads the log.
const BUFFER: usize = 4096;
/// How often a feed reads the log without being told to: notices sent while the listener was
/// reconnecting are lost, the log is not.
const SWEEP: Duration = Duration::from_secs(1);

/// One event at its place in an account's log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Logged {
    pub position: i64,
    /// With its cursor set.
    pub event: pb::ConversationEvent,
}

/// The account's events after `position`, at most [`PAGE`], in order.
async fn read_after(
    store: &dyn RoutingStore,
    account_id: &str,
    position: i64,
) -> Result<Vec<Logged>, sqlx::Error> {
    store
        .log_after(account_id, position, PAGE)
        .await?
        .into_iter()
        .map(|(position, payload)| {
            let mut event = pb::ConversationEvent::decode(payload.as_slice())
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            event.cursor = cursor(account_id, position);
            Ok(Logged { position, event })
        })
        .collect()
}

/// Cursors name the account and the position, opaque to clients.
pub(crate) fn cursor(account_id: &str, position: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{position}:{account_id}"))
}

/// The position a cursor of `account_id` stands for.
pub(crate) fn position(cursor: &str, account_id: &str) -> Option<i64> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (position, account) = text.split_once(':')?;
    let position: i64 = position.parse().ok()?;
    (account == account_id && position >= 0).then_some(position)
}

/// Which events a stream shows.
pub(crate) type Filter = Box<dyn Fn(&pb::ConversationEvent) -> bool + Send + Sync>;

pub(crate) type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchConversationsResponse, Status>> + Send>>;

/// One account's events as this replica has read them.
#[derive(Debug)]
struct AccountFeed {
    sender: broadcast::Sender<Arc<Logged>>,
    /// The last position read and sent; held while reading, so reads do not overlap.
    read: tokio::sync::Mutex<i64>,
}

/// This replica's fan-out of the log to its streams.
#[derive(Debug, Clone)]
pub(crate) struct Feed {
    store: Arc<dyn RoutingStore>,
    accounts: Arc<Mutex<HashMap<String, Arc<AccountFeed>>>>,
    /// Cancelled when the server stops accepting requests: streams end, clients reconnect.
    closing: CancellationToken,
}

impl Feed {
    pub fn new(store: Arc<dyn RoutingStore>, closing: CancellationToken) -> Self {
        Self {
            store,
            accounts: Arc::default(),
            closing,
        }
    }

    /// Listens for new events until `shutdown`, reading each notified account's once however
    /// many notices came together, and every account's each [`SWEEP`].
    pub async fn run(self, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP);
        loop {
            let mut listener = match self.store.listen().await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::debug!(%error, "conversation feed: cannot listen yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                let notified = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sweep.tick() => None,
                    notice = listener.recv() => match notice {
                        Ok(notice) => Some(notice),
                        Err(error) => {
                            tracing::warn!(%error, "conversation feed: listener lost, reconnecting");
                            break;
                        }
                    },
                };
                let accounts: HashSet<String> = match notified {
                    Some(first) => std::iter::once(first)
                        .chain(std::iter::from_fn(|| listener.buffered()))
                        .collect(),
                    None => self.watched(),
                };
                for account_id in accounts {
                    self.read(&account_id).await;
                }
            }
        }
    }

    /// The accounts with streams on this replica, forgetting those without.
    fn watched(&self) -> HashSet<String> {
        let mut accounts = self.accounts.lock().expect("feed accounts");
        accounts.retain(|_, feed| feed.sender.receiver_count() > 0);
        accounts.keys().cloned().collect()
    }

    /// Reads the account's new events and sends them to its streams.
    async fn read(&self, account_id: &str) {
        let Some(feed) = self
            .accounts
            .lock()
            .expect("feed accounts")
            .get(account_id)
            .cloned()
        else {
            return;
        };
        let mut read = feed.read.lock().await;
        loop {
            match read_after(&*self.store, account_id, *read).await {
                Ok(events) => {
                    let full = events.len() as i64 == PAGE;
                    for logged in events {
                        *read = logged.position;
                        // No receivers: the last stream just left.
                        let _ = feed.sender.send(Arc::new(logged));
                    }
                    if !full {
                        return;
                    }
                }
                Err(error) => {
                    // The next notice or sweep reads again; streams wait meanwhile.
                    tracing::warn!(%error, account_id, "conversation feed: cannot read the log");
                    return;
                }
            }
        }
    }

    /// A subscription to this replica's feed of `account_id`, made on first use, reading from
    /// the log's head. Subscribed under the lock that [`Feed::watched`] forgets feeds under, so a
    /// feed is never forgotten between being found and being subscribed to.
    async fn subscribe(
        &self,
        account_id: &str,
    ) -> Result<broadcast::Receiver<Arc<Logged>>, sqlx::Error> {
        if let Some(feed) = self.accounts.lock().expect("feed accounts").get(account_id) {
            return Ok(feed.sender.subscribe());
        }
        let at = self.store.log_head(account_id).await?;
        let mut accounts = self.accounts.lock().expect("feed accounts");
        let feed = accounts.entry(account_id.to_owned()).or_insert_with(|| {
            Arc::new(AccountFeed {
                sender: broadcast::channel(BUFFER).0,
                read: tokio::sync::Mutex::new(at),
            })
        });
        Ok(feed.sender.subscribe())
    }

    /// The account's events after `after` (`None`: after the latest), those `show` lets through.
    pub async fn watch(
        &self,
        account_id: String,
        after: Option<i64>,
        show: Filter,
    ) -> Result<EventStream, sqlx::Error> {
        // Subscribed before the log is read, so nothing falls between the two.
        let mut live = self.subscribe(&account_id).await?;
        let seen = match after {
            Some(position) => position,
            None => self.store.log_head(&account_id).await?,
        };
        let (tx, rx) = mpsc::channel(64);
        let stream = Subscriber {
            store: self.store.clone(),
            account_id,
            tx,
            show,
        };
        let closing = self.closing.clone();
        tokio::spawn(async move {
            let ended = match stream.follow(&mut live, seen, &closing).await {
                Ok(()) => return,
                Err(status) => status,
            };
            let _ = stream.tx.send(Err(ended)).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// One stream's task: the log from its position, then the feed, back to the log for what the
/// feed did not bring.
struct Subscriber {
    store: Arc<dyn RoutingStore>,
    account_id: String,
    tx: mpsc::Sender<Result<pb::WatchConversationsResponse, Status>>,
    show: Filter,
}

/// The client hung up: nothing more to do.
struct Gone;

impl Subscriber {
    /// Follows the log from `seen` until the client hangs up (`Ok`) or the stream must end with
    /// a status for the client to reconnect on.
    async fn follow(
        &self,
        live: &mut broadcast::Receiver<Arc<Logged>>,
        mut seen: i64,
        closing: &CancellationToken,
    ) -> Result<(), Status> {
        seen = match self.catch_up(seen, None).await? {
            Ok(at) => at,
            Err(Gone) => return Ok(()),
        };
        loop {
            let next = tokio::select! {
                _ = closing.cancelled() => {
                    return Err(Status::unavailable(
                        "the server is shutting down: reconnect with your last cursor",
                    ));
                }
                _ = self.tx.closed() => return Ok(()),
                next = live.recv() => next,
            };
            let logged = match next {
                Ok(logged) if logged.position <= seen => continue,
                Ok(logged) if logged.position == seen + 1 => logged,
                // A gap (this stream subscribed while the feed was mid-read): the log has what
                // came before this event.
                Ok(logged) => match self.catch_up(seen, Some(logged.position - 1)).await? {
                    Ok(at) if at + 1 == logged.position => logged,
                    Ok(at) => {
                        seen = at;
                        continue;
                    }
                    Err(Gone) => return Ok(()),
                },
                // Further behind than the feed's buffer: the log has it all.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    seen = match self.catch_up(seen, None).await? {
                        Ok(at) => at,
                        Err(Gone) => return Ok(()),
                    };
                    continue;
                }
                // The feed went away under it: the client reconnects from what it saw.
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Status::unavailable(
                        "the stream's feed closed: reconnect with your last cursor",
                    ));
                }
            };
            if self.send(&logged).await.is_err() {
                return Ok(());
            }
            seen = logged.position;
        }
    }

    /// Sends the events after `seen` up to `until` (or the log's end) from the log; the last
    /// position sent.
    async fn catch_up(
        &self,
        mut seen: i64,
        until: Option<i64>,
    ) -> Result<Result<i64, Gone>, Status> {
        loop {
            let events = read_after(&*self.store, &self.account_id, seen)
                .await
                .map_err(log_unavailable)?;
            let full = events.len() as i64 == PAGE;
            for logged in &events {
                if until.is_some_and(|until| logged.position > until) {
                    return Ok(Ok(seen));
                }
                if let Err(gone) = self.send(logged).await {
                    return Ok(Err(gone));
                }
                seen = logged.position;
            }
            if !full {
                return Ok(Ok(seen));
            }
        }
    }

    async fn send(&self, logged: &Logged) -> Result<(), Gone> {
        if !(self.show)(&logged.event) {
            return Ok(());
        }
        let item = Ok(pb::WatchConversationsResponse {
            event: Some(logged.event.clone()),
        });
        self.tx.send(item).await.map_err(|_| Gone)
    }
}

fn log_unavailable(error: sqlx::Error) -> Status {
    tracing::warn!(%error, "conversation stream: cannot read the log");
    Status::unavailable("cannot read the conversation log: reconnect with your last cursor")
}

#[cfg(test)]
mod tests {
    use super::*;
    use c2m_test_support::TestDatabase;
    use futures::StreamExt;

    /// Eight writers append 400 events to one account while three streams follow it: one from
    /// the start (a cursor at 0), one from now, one that joins halfway. Each sees every position
    /// after its start exactly once, in order, though writers commit concurrently and the feed
    /// reads in bursts.
    #[tokio::test]
    async fn streams_see_every_event_once_in_order_while_writers_race() {
        let database = TestDatabase::create().await;
        let db = database.migrated(crate::SCHEMA, &crate::MIGRATOR).await;
        streams_follow(Arc::new(crate::store::PgRoutingStore::new(db.clone()))).await;
    }

    /// The same on the embedded default's file, whose notices are this process's.
    #[tokio::test]
    async fn streams_see_every_event_once_in_order_on_sqlite() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pool = c2m_storage::sqlite::open(&dir.path().join("routing.db"))
            .await
            .expect("opens");
        let store = crate::store::SqliteRoutingStore::new(pool)
            .await
            .expect("migrated");
        streams_follow(Arc::new(store)).await;
    }

    async fn streams_follow(store: Arc<dyn RoutingStore>) {
        let shutdown = CancellationToken::new();
        let feed = Feed::new(store.clone(), CancellationToken::new());
        let listening = tokio::spawn(feed.clone().run(shutdown.clone()));
        let everything = || -> Filter { Box::new(|_| true) };
        let from_start = feed
            .watch("acme".into(), Some(0), everything())
            .await
            .expect("watch");
        let from_now = feed
            .watch("acme".into(), None, everything())
            .await
            .expect("watch");
        // Another account's events are not acme's.
        let mut other = store.begin().await.expect("tx");
        other
            .log("globex", &[event("globex", 0)])
            .await
            .expect("append");
        other.commit().await.expect("commit");

        let write = |writer: usize| {
            let store = store.clone();
            async move {
                for i in 0..50 {
                    let mut tx = store.begin().await.expect("tx");
                    tx.log("acme", &[event("acme", writer * 100 + i)])
                        .await
                        .expect("append");
                    tx.commit().await.expect("commit");
                }
            }
        };
        let first_half = futures::future::join_all((0..4).map(write));
        first_half.await;
        let halfway = feed
            .watch("acme".into(), Some(100), everything())
            .await
            .expect("watch");
        futures::future::join_all((4..8).map(write)).await;

        let positions = |stream: EventStream, count: usize| async move {
            let events: Vec<_> = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                stream.take(count).collect::<Vec<_>>(),
            )
            .await
            .expect("every event within 30 s");
            events
                .into_iter()
                .map(|e| {
                    let event = e.expect("healthy").event.expect("event");
                    assert_eq!(event.account_id, "acme");
                    position(&event.cursor, "acme").expect("a cursor of acme")
                })
                .collect::<Vec<i64>>()
        };
        assert_eq!(
            positions(from_start, 400).await,
            (1..=400).collect::<Vec<_>>()
        );
        assert_eq!(
            positions(from_now, 400).await,
            (1..=400).collect::<Vec<_>>()
        );
        assert_eq!(
            positions(halfway, 300).await,
            (101..=400).collect::<Vec<_>>()
        );
        shutdown.cancel();
        listening.await.expect("the feed stops");
    }

    fn event(account_id: &str, n: usize) -> pb::ConversationEvent {
        pb::ConversationEvent {
            conversation_id: format!("conv-{n}"),
            account_id: account_id.into(),
            skill_id: "billing".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_cursor_is_its_accounts_only() {
        let c = cursor("acme", 42);
        assert_eq!(position(&c, "acme"), Some(42));
        assert_eq!(position(&c, "globex"), None);
        assert_eq!(position("not a cursor", "acme"), None);
        assert_eq!(position(&cursor("acme", -1), "acme"), None);
    }
}
