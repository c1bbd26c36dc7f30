//! The expected-response queue: for every message pgwarp sends to an origin connection, what
//! answer it expects and who that answer is for.
//!
//! It is a pure state machine. The session pushes an `Expect` for each message it sends (and a
//! `Synthetic` answer for each client message it answered itself, so answers stay in order), then
//! feeds it every origin message and carries out the `Decision`: forward to the client, drop, or
//! hand to pgwarp's own bookkeeping. After an ErrorResponse in the extended protocol Postgres
//! skips every message until Sync; the queue does the same, so the two never fall out of step.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::protocol::backend as be;

/// Whose answer a response is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The client asked: forward.
    Client,
    /// pgwarp sent it on the client's behalf (a replayed Parse): drop success, forward errors.
    Hidden,
    /// pgwarp's own query (settings, clean-up): drop everything; rows and errors go to pgwarp.
    Internal,
}

/// What to forget when a message never took effect (it failed, or was skipped after an error).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Undo {
    /// The client's statement (name, content id) whose Parse failed.
    pub client_statement: Option<(String, Arc<str>)>,
    /// The server-side statement that was not prepared on this connection.
    pub server_statement: Option<Arc<str>>,
    /// The connection's unnamed statement is no longer what pgwarp thinks.
    pub unnamed: bool,
}

#[derive(Debug)]
pub enum Expect {
    ParseComplete {
        owner: Owner,
        undo: Option<Undo>,
    },
    /// BindComplete; `statement` names the prepared statement bound, if a named one.
    BindComplete {
        statement: Option<Arc<str>>,
    },
    CloseComplete {
        owner: Owner,
    },
    /// Describe of a statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// Describe of a portal: RowDescription or NoData.
    DescribePortal,
    /// DataRows, then CommandComplete, EmptyQueryResponse or PortalSuspended; or a COPY.
    Execute,
    /// ReadyForQuery.
    Sync {
        owner: Owner,
    },
    /// A simple Query or FunctionCall: everything up to and including ReadyForQuery. `undo`
    /// applies if it fails; `executes` names the prepared statement an EXECUTE runs.
    Query {
        owner: Owner,
        undo: Option<Undo>,
        executes: Option<Arc<str>>,
    },
    /// An answer pgwarp made itself, sent to the client when it reaches the head of the queue.
    Synthetic {
        message: Bytes,
        undo: Option<Undo>,
    },
    /// A Describe of a statement that cannot exist, sent only so that the origin fails where
    /// the client's message would have, aborting its transaction (or pipeline) as Postgres
    /// would. The client already has pgwarp's own error for it: the origin's is dropped.
    Abort,
}

impl Expect {
    /// A simple query with nothing to undo.
    pub fn query(owner: Owner) -> Expect {
        Expect::Query { owner, undo: None, executes: None }
    }

    fn owner(&self) -> Owner {
        match self {
            Expect::ParseComplete { owner, .. }
            | Expect::CloseComplete { owner }
            | Expect::Sync { owner }
            | Expect::Query { owner, .. } => *owner,
            _ => Owner::Client,
        }
    }

    fn is_sync(&self) -> bool {
        matches!(self, Expect::Sync { .. })
    }

    fn take_undo(self) -> Option<Undo> {
        match self {
            // A Query's undo too: a replayed SQL PREPARE inside an extended batch is skipped
            // like any other message after an error.
            Expect::ParseComplete { undo, .. } | Expect::Synthetic { undo, .. } | Expect::Query { undo, .. } => undo,
            _ => None,
        }
    }
}

/// What to do with one origin message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Send it to the client.
    pub forward: bool,
    /// It belongs to pgwarp's own query.
    pub internal: bool,
    /// A ReadyForQuery completed an entry: the transaction status.
    pub ready: Option<u8>,
    /// The origin entered COPY FROM STDIN: the client's CopyData must now flow through.
    pub copy_in: bool,
    /// Messages that never took effect.
    pub undone: Vec<Undo>,
    /// An error answered a Bind of this named statement (its plan may be stale).
    pub failed_bind: Option<Arc<str>>,
    /// It answers SQL the client wrote (its simple query, or an Execute of its own Parse),
    /// not SQL pgwarp wrote on its behalf.
    pub client_sql: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("origin sent message {tag:?} while pgwarp expected {expected}")]
    Unexpected { tag: char, expected: &'static str },
}

#[derive(Debug, Default)]
pub struct ResponseQueue {
    entries: VecDeque<Expect>,
    /// An extended-protocol error happened and no Sync has been sent since: Postgres discards
    /// everything until the next Sync, so expect nothing for it.
    skipping: bool,
}

impl ResponseQueue {
    pub fn new() -> Self {
        ResponseQueue::default()
    }

    /// Nothing outstanding: every answer has arrived, and the origin is not discarding input
    /// until a Sync (a connection in that state would swallow the next client's messages).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && !self.skipping
    }

    /// The origin is discarding everything until the next Sync (an extended-protocol error
    /// arrived and no Sync has been sent since).
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    /// A message already sent may still start a COPY FROM STDIN: a client's Execute or simple
    /// query is unanswered. Until the origin says, copy input sent ahead must wait.
    pub fn may_start_copy(&self) -> bool {
        self.entries.iter().any(|e| matches!(e, Expect::Execute | Expect::Query { owner: Owner::Client, .. }))
    }

    /// Answers are owed for messages already sent.
    pub fn has_entries(&self) -> bool {
        !self.entries.is_empty()
    }

    /// pgwarp sent a Sync of its own and read its ReadyForQuery: nothing is owed any more and
    /// the origin is back to processing messages.
    pub fn reset(&mut self) {
        self.entries.clear();
        self.skipping = false;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records what the message just sent will produce. Returns what to forget when Postgres
    /// will discard the message because an earlier one failed.
    pub fn push(&mut self, expect: Expect) -> Option<Undo> {
        if self.skipping {
            if expect.is_sync() {
                self.skipping = false;
            } else {
                return expect.take_undo();
            }
        }
        self.entries.push_back(expect);
        None
    }

    /// Whether the client statement `name` was created by a message still awaiting its answer,
    /// and if so whether a Sync (or the end of a simple query) comes after it: then that message
    /// may yet be skipped by an error before it, and a later message of another Sync's segment
    /// cannot know whether the name exists. Scans the queue: only for duplicate names.
    pub fn pending_statement(&self, name: &str) -> Option<bool> {
        let at = self.entries.iter().position(|e| {
            let undo = match e {
                Expect::ParseComplete { undo, .. } | Expect::Synthetic { undo, .. } | Expect::Query { undo, .. } => {
                    undo
                }
                _ => return false,
            };
            undo.as_ref().and_then(|u| u.client_statement.as_ref()).is_some_and(|(n, _)| n == name)
        })?;
        let closed = matches!(self.entries[at], Expect::Query { .. })
            || self.entries.iter().skip(at + 1).any(|e| matches!(e, Expect::Sync { .. } | Expect::Query { .. }));
        Some(closed)
    }

    /// Moves answers pgwarp made itself that are now due into `out`, in order.
    pub fn drain_synthetic(&mut self, out: &mut BytesMut) {
        while let Some(Expect::Synthetic { .. }) = self.entries.front() {
            if let Some(Expect::Synthetic { message, .. }) = self.entries.pop_front() {
                out.extend_from_slice(&message);
            }
        }
    }

    /// The common case of `on_message`, decided without building a `Decision`: an answer to the
    /// client's own message that only moves the queue along (no error, status, COPY or
    /// asynchronous message). Returns false, changing nothing, for anything else: the caller
    /// then hands the message to `on_message`.
    pub fn pass(&mut self, tag: u8) -> bool {
        let Some(head) = self.entries.front() else {
            return false;
        };
        let done = match (head, tag) {
            (Expect::Execute, be::DATA_ROW | be::COPY_DATA) => false,
            (Expect::Execute, be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED) => true,
            (Expect::ParseComplete { owner: Owner::Client, .. }, be::PARSE_COMPLETE) => true,
            (Expect::BindComplete { .. }, be::BIND_COMPLETE) => true,
            (Expect::CloseComplete { owner: Owner::Client }, be::CLOSE_COMPLETE) => true,
            (Expect::DescribeStatement, be::PARAMETER_DESCRIPTION) => false,
            (Expect::DescribeStatement | Expect::DescribePortal, be::ROW_DESCRIPTION | be::NO_DATA) => true,
            (
                Expect::Query { owner: Owner::Client, .. },
                be::ROW_DESCRIPTION | be::DATA_ROW | be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::COPY_DATA,
            ) => false,
            _ => return false,
        };
        if done {
            self.entries.pop_front();
        }
        true
    }

    /// An answer pgwarp made itself is next in line (`drain_synthetic` sends it).
    pub fn synthetic_due(&self) -> bool {
        matches!(self.entries.front(), Some(Expect::Synthetic { .. }))
    }

    /// Decides what to do with one message from the origin.
    pub fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<Decision, QueueError> {
        let head_owner = self.entries.front().map(Expect::owner);
        let internal = head_owner == Some(Owner::Internal);
        // Answers go to the client only for its own messages; errors and asynchronous messages
        // also for what pgwarp sent on its behalf.
        let mut d =
            Decision { forward: head_owner.is_none_or(|o| o == Owner::Client), internal, ..Decision::default() };
        match tag {
            // Asynchronous messages may come at any time; they go with whatever is running.
            be::NOTICE_RESPONSE | be::PARAMETER_STATUS | be::NOTIFICATION_RESPONSE => {
                d.forward = !internal;
                return Ok(d);
            }
            be::ERROR_RESPONSE => {
                self.on_error(&mut d);
                return Ok(d);
            }
            _ => {}
        }
        let Some(head) = self.entries.front_mut() else {
            return Err(QueueError::Unexpected { tag: tag as char, expected: "nothing" });
        };
        let unexpected = |expected| Err(QueueError::Unexpected { tag: tag as char, expected });
        d.client_sql =
            matches!(head, Expect::Execute | Expect::Query { owner: Owner::Client, undo: None, executes: None });
        let done = match (&*head, tag) {
            (Expect::ParseComplete { owner, .. }, be::PARSE_COMPLETE) => {
                d.forward = *owner == Owner::Client;
                true
            }
            (Expect::BindComplete { .. }, be::BIND_COMPLETE) => true,
            (Expect::CloseComplete { owner }, be::CLOSE_COMPLETE) => {
                d.forward = *owner == Owner::Client;
                true
            }
            (Expect::DescribeStatement, be::PARAMETER_DESCRIPTION) => false,
            // Only if someone created the impossible statement: no error, and nothing to forward.
            (Expect::Abort, be::PARAMETER_DESCRIPTION) => {
                d.forward = false;
                false
            }
            (Expect::Abort, be::ROW_DESCRIPTION | be::NO_DATA) => {
                d.forward = false;
                true
            }
            (Expect::DescribeStatement | Expect::DescribePortal, be::ROW_DESCRIPTION | be::NO_DATA) => true,
            (Expect::Execute, be::DATA_ROW | be::COPY_OUT_RESPONSE | be::COPY_DATA | be::COPY_DONE) => false,
            (Expect::Execute, be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED) => true,
            (Expect::Execute, be::COPY_IN_RESPONSE) => {
                d.copy_in = true;
                // A Sync sent right after the Execute is swallowed by COPY FROM STDIN (Postgres
                // ignores Sync and Flush in copy-in mode); only the client's Sync after
                // CopyDone will be answered.
                while matches!(self.entries.get(1), Some(Expect::Sync { .. })) {
                    self.entries.remove(1);
                }
                false
            }
            (Expect::Query { .. }, be::READY_FOR_QUERY) | (Expect::Sync { .. }, be::READY_FOR_QUERY) => {
                let status = be::ready_status(body)
                    .map_err(|_| QueueError::Unexpected { tag: 'Z', expected: "a valid transaction status" })?;
                d.ready = Some(status);
                d.forward = head.owner() == Owner::Client;
                true
            }
            (Expect::Query { .. }, be::COPY_IN_RESPONSE) => {
                d.copy_in = true;
                false
            }
            (Expect::Query { .. }, _) if is_query_response(tag) => false,
            (Expect::ParseComplete { .. }, _) => return unexpected("ParseComplete"),
            (Expect::BindComplete { .. }, _) => return unexpected("BindComplete"),
            (Expect::CloseComplete { .. }, _) => return unexpected("CloseComplete"),
            (Expect::DescribeStatement, _) => return unexpected("a statement description"),
            (Expect::Abort, _) => return unexpected("an error"),
            (Expect::DescribePortal, _) => return unexpected("a portal description"),
            (Expect::Execute, _) => return unexpected("Execute results"),
            (Expect::Sync { .. }, _) => return unexpected("ReadyForQuery"),
            (Expect::Query { .. }, _) => return unexpected("a simple query response"),
            (Expect::Synthetic { .. }, _) => return unexpected("nothing before a synthetic answer"),
        };
        if done {
            self.entries.pop_front();
        }
        Ok(d)
    }

    fn on_error(&mut self, d: &mut Decision) {
        let internal = matches!(self.entries.front(), Some(e) if e.owner() == Owner::Internal);
        let abort = matches!(self.entries.front(), Some(Expect::Abort));
        d.forward = !internal && !abort;
        let Some(head) = self.entries.front_mut() else {
            return;
        };
        match head {
            // Part of a simple query: ReadyForQuery still follows.
            Expect::Query { undo, executes, .. } => {
                d.undone.extend(undo.take());
                d.failed_bind = executes.take();
            }
            // Part of the commit at Sync: ReadyForQuery still follows.
            Expect::Sync { .. } => {}
            Expect::Synthetic { .. } => {}
            _ => {
                // The failed message, and everything Postgres will now skip until Sync.
                let owner = head.owner();
                d.forward = owner != Owner::Internal && !abort;
                if let Expect::BindComplete { statement } = head {
                    d.failed_bind = statement.clone();
                }
                while let Some(e) = self.entries.front() {
                    if e.is_sync() {
                        return;
                    }
                    if let Some(undo) = self.entries.pop_front().and_then(Expect::take_undo) {
                        d.undone.push(undo);
                    }
                }
                self.skipping = true;
            }
        }
    }
}

/// Messages that may appear inside a simple query's response.
fn is_query_response(tag: u8) -> bool {
    matches!(
        tag,
        be::ROW_DESCRIPTION
            | be::DATA_ROW
            | be::COMMAND_COMPLETE
            | be::EMPTY_QUERY_RESPONSE
            | be::COPY_OUT_RESPONSE
            | be::COPY_DATA
            | be::COPY_DONE
            | be::COPY_BOTH_RESPONSE
            | be::FUNCTION_CALL_RESPONSE
            | be::NO_DATA
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::build;

    fn feed(q: &mut ResponseQueue, msgs: &[&[u8]]) -> Vec<Decision> {
        msgs.iter().map(|m| q.on_message(m[0], &m[5..]).unwrap()).collect()
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn queue_of<const N: usize>(entries: [Expect; N]) -> ResponseQueue {
        let mut q = ResponseQueue::new();
        for e in entries {
            q.push(e);
        }
        q
    }

    fn forwarded(ds: &[Decision]) -> Vec<bool> {
        ds.iter().map(|d| d.forward).collect()
    }

    #[test]
    fn simple_query_forwards_everything_until_ready() {
        let mut q = ResponseQueue::new();
        q.push(Expect::query(Owner::Client));
        let ds = feed(&mut q, &[&msg(b'T', b""), &msg(b'D', b""), &msg(b'C', b"SELECT 1\0"), &msg(b'Z', b"I")]);
        assert_eq!(forwarded(&ds), vec![true; 4]);
        assert_eq!(ds[3].ready, Some(b'I'));
        assert!(q.is_empty());
    }

    #[test]
    fn extended_sequence_completes_each_entry() {
        let mut q = queue_of([
            Expect::ParseComplete { owner: Owner::Client, undo: None },
            Expect::BindComplete { statement: None },
            Expect::DescribePortal,
            Expect::Execute,
            Expect::Sync { owner: Owner::Client },
        ]);
        let ds = feed(
            &mut q,
            &[
                &msg(b'1', b""),
                &msg(b'2', b""),
                &msg(b'T', b""),
                &msg(b'D', b""),
                &msg(b'D', b""),
                &msg(b'C', b"SELECT 2\0"),
                &msg(b'Z', b"T"),
            ],
        );
        assert!(ds.iter().all(|d| d.forward));
        assert_eq!(ds.last().unwrap().ready, Some(b'T'));
        assert!(q.is_empty());
    }

    #[test]
    fn pass_takes_plain_answers_and_leaves_the_rest_to_on_message() {
        let mut q = queue_of([
            Expect::ParseComplete { owner: Owner::Client, undo: None },
            Expect::BindComplete { statement: None },
            Expect::DescribePortal,
            Expect::Execute,
            Expect::Synthetic { message: build::close_complete(), undo: None },
            Expect::Sync { owner: Owner::Client },
        ]);
        for tag in [b'1', b'2', b'T', b'D', b'D'] {
            assert!(q.pass(tag), "{}", tag as char);
        }
        assert!(!q.pass(be::ERROR_RESPONSE) && !q.pass(be::NOTICE_RESPONSE) && !q.pass(be::PARAMETER_STATUS));
        assert!(!q.synthetic_due());
        assert!(q.pass(b'C'));
        assert!(q.synthetic_due());
        let mut out = BytesMut::new();
        q.drain_synthetic(&mut out);
        assert_eq!(&out[..], &build::close_complete()[..]);
        assert!(!q.pass(be::READY_FOR_QUERY));
        assert_eq!(q.on_message(be::READY_FOR_QUERY, b"I").unwrap().ready, Some(b'I'));
        assert!(q.is_empty());
    }

    #[test]
    fn pass_leaves_hidden_internal_and_copy_answers_to_on_message() {
        assert!(!queue_of([Expect::ParseComplete { owner: Owner::Hidden, undo: None }]).pass(be::PARSE_COMPLETE));
        assert!(!queue_of([Expect::query(Owner::Internal)]).pass(be::DATA_ROW));
        let mut q = queue_of([Expect::Execute]);
        assert!(!q.pass(be::COPY_IN_RESPONSE) && !q.pass(be::COPY_OUT_RESPONSE));
        assert!(!queue_of([Expect::Abort]).pass(be::NO_DATA));
        assert!(!ResponseQueue::new().pass(be::DATA_ROW));
    }

    #[test]
    fn replayed_parse_is_hidden_but_its_error_is_not() {
        let mut q = ResponseQueue::new();
        q.push(Expect::ParseComplete { owner: Owner::Hidden, undo: None });
        q.push(Expect::BindComplete { statement: None });
        q.push(Expect::Sync { owner: Owner::Client });
        let d = q.on_message(b'1', b"").unwrap();
        assert!(!d.forward);

        let undo = Undo { server_statement: Some("pgwarp_x".into()), ..Undo::default() };
        let mut q = ResponseQueue::new();
        q.push(Expect::ParseComplete { owner: Owner::Hidden, undo: Some(undo.clone()) });
        q.push(Expect::BindComplete { statement: None });
        q.push(Expect::Execute);
        q.push(Expect::Sync { owner: Owner::Client });
        let d = q.on_message(b'E', b"").unwrap();
        assert!(d.forward);
        assert_eq!(d.undone, vec![undo]);
        let d = q.on_message(b'Z', b"I").unwrap();
        assert!(d.forward && d.ready == Some(b'I'));
        assert!(q.is_empty());
    }

    #[test]
    fn error_mid_pipeline_skips_to_the_next_sync_and_undoes_skipped_parses() {
        let mut q = ResponseQueue::new();
        let undo = Undo { client_statement: Some(("s2".into(), "pgwarp_2".into())), ..Undo::default() };
        q.push(Expect::BindComplete { statement: None });
        q.push(Expect::Execute);
        q.push(Expect::ParseComplete { owner: Owner::Client, undo: Some(undo.clone()) });
        q.push(Expect::Synthetic { message: build::parse_complete(), undo: Some(undo.clone()) });
        q.push(Expect::Sync { owner: Owner::Client });
        q.push(Expect::BindComplete { statement: None });
        q.push(Expect::Execute);
        q.push(Expect::Sync { owner: Owner::Client });
        feed(&mut q, &[&msg(b'2', b"")]);
        let d = q.on_message(b'E', b"").unwrap();
        assert!(d.forward);
        assert_eq!(d.undone, vec![undo.clone(), undo]);
        let mut out = BytesMut::new();
        q.drain_synthetic(&mut out);
        assert!(out.is_empty(), "a skipped synthetic answer must never be sent");
        let ds = feed(&mut q, &[&msg(b'Z', b"I"), &msg(b'2', b""), &msg(b'C', b"X\0"), &msg(b'Z', b"I")]);
        assert_eq!(ds[0].ready, Some(b'I'));
        assert_eq!(ds[3].ready, Some(b'I'));
        assert!(q.is_empty());
    }

    #[test]
    fn error_before_sync_is_sent_skips_messages_pushed_later() {
        let mut q = ResponseQueue::new();
        q.push(Expect::Execute);
        let d = q.on_message(b'E', b"").unwrap();
        assert!(d.forward);
        assert!(!q.has_entries() && !q.is_empty());
        // The client flushed, saw the error, and kept going before its Sync.
        let undo = Undo { client_statement: Some(("s".into(), "pgwarp_1".into())), ..Undo::default() };
        assert_eq!(q.push(Expect::ParseComplete { owner: Owner::Client, undo: Some(undo.clone()) }), Some(undo));
        assert_eq!(q.push(Expect::BindComplete { statement: None }), None);
        assert!(!q.has_entries());
        q.push(Expect::Sync { owner: Owner::Client });
        let d = q.on_message(b'Z', b"I").unwrap();
        assert_eq!(d.ready, Some(b'I'));
        assert!(q.is_empty());
    }

    #[test]
    fn a_queue_skipping_to_sync_is_not_empty_until_reset() {
        let mut q = ResponseQueue::new();
        q.push(Expect::Execute);
        q.on_message(b'E', b"").unwrap();
        assert!(!q.has_entries());
        assert!(q.is_skipping() && !q.is_empty(), "the origin still discards until a Sync");
        q.reset();
        assert!(q.is_empty());
    }

    #[test]
    fn synthetic_answers_keep_their_place() {
        let mut q = ResponseQueue::new();
        q.push(Expect::Synthetic { message: build::parse_complete(), undo: None });
        q.push(Expect::BindComplete { statement: None });
        q.push(Expect::Synthetic { message: build::close_complete(), undo: None });
        q.push(Expect::Sync { owner: Owner::Client });
        let mut out = BytesMut::new();
        q.drain_synthetic(&mut out);
        assert_eq!(&out[..], &build::parse_complete()[..]);
        out.clear();
        q.on_message(b'2', b"").unwrap();
        q.drain_synthetic(&mut out);
        assert_eq!(&out[..], &build::close_complete()[..]);
        assert_eq!(q.on_message(b'Z', b"I").unwrap().ready, Some(b'I'));
    }

    #[test]
    fn internal_query_is_dropped_and_marked() {
        let mut q = ResponseQueue::new();
        q.push(Expect::query(Owner::Internal));
        q.push(Expect::query(Owner::Client));
        let ds = feed(
            &mut q,
            &[
                &msg(b'S', b"TimeZone\0UTC\0"),
                &msg(b'T', b""),
                &msg(b'D', b""),
                &msg(b'C', b"SELECT 1\0"),
                &msg(b'Z', b"I"),
                &msg(b'C', b"SET\0"),
                &msg(b'Z', b"I"),
            ],
        );
        assert_eq!(forwarded(&ds), vec![false, false, false, false, false, true, true]);
        assert!(ds[..5].iter().all(|d| d.internal));
        let d = {
            let mut q = ResponseQueue::new();
            q.push(Expect::query(Owner::Internal));
            q.on_message(b'E', b"").unwrap()
        };
        assert!(!d.forward && d.internal);
    }

    #[test]
    fn error_in_simple_query_still_waits_for_ready() {
        let mut q = ResponseQueue::new();
        q.push(Expect::query(Owner::Client));
        let ds = feed(&mut q, &[&msg(b'E', b""), &msg(b'Z', b"E")]);
        assert!(ds[0].forward && ds[0].undone.is_empty());
        assert_eq!(ds[1].ready, Some(b'E'));
    }

    #[test]
    fn extended_copy_in_swallows_the_sync_sent_with_execute() {
        let mut q = ResponseQueue::new();
        q.push(Expect::BindComplete { statement: None });
        q.push(Expect::Execute);
        q.push(Expect::Sync { owner: Owner::Client });
        feed(&mut q, &[&msg(b'2', b"")]);
        let d = q.on_message(b'G', b"").unwrap();
        assert!(d.copy_in && d.forward);
        // CopyData/CopyDone go through; then the client's own Sync after CopyDone.
        q.push(Expect::Sync { owner: Owner::Client });
        let ds = feed(&mut q, &[&msg(b'C', b"COPY 3\0"), &msg(b'Z', b"I")]);
        assert_eq!(ds[1].ready, Some(b'I'));
        assert!(q.is_empty());
    }

    #[test]
    fn simple_copy_out_flows_through() {
        let mut q = ResponseQueue::new();
        q.push(Expect::query(Owner::Client));
        let ds = feed(
            &mut q,
            &[&msg(b'H', b""), &msg(b'd', b"1\n"), &msg(b'c', b""), &msg(b'C', b"COPY 1\0"), &msg(b'Z', b"I")],
        );
        assert!(ds.iter().all(|d| d.forward));
        assert!(q.is_empty());
    }

    #[test]
    fn describe_statement_takes_two_messages() {
        let mut q = ResponseQueue::new();
        q.push(Expect::DescribeStatement);
        q.push(Expect::Sync { owner: Owner::Client });
        let ds = feed(&mut q, &[&msg(b't', b""), &msg(b'n', b""), &msg(b'Z', b"I")]);
        assert!(ds.iter().all(|d| d.forward));
        assert!(q.is_empty());
    }

    #[test]
    fn failed_bind_names_its_statement() {
        let mut q = ResponseQueue::new();
        q.push(Expect::BindComplete { statement: Some("pgwarp_x".into()) });
        q.push(Expect::Execute);
        q.push(Expect::Sync { owner: Owner::Client });
        let d = q.on_message(b'E', b"").unwrap();
        assert_eq!(d.failed_bind.as_deref(), Some("pgwarp_x"));
        assert_eq!(q.on_message(b'Z', b"I").unwrap().ready, Some(b'I'));
    }

    #[test]
    fn out_of_step_messages_are_an_error() {
        let mut q = ResponseQueue::new();
        assert!(q.on_message(b'1', b"").is_err());
        q.push(Expect::BindComplete { statement: None });
        assert!(q.on_message(b'1', b"").is_err());
        let mut q = ResponseQueue::new();
        q.push(Expect::Sync { owner: Owner::Client });
        assert!(q.on_message(b'Z', b"?").is_err());
    }

    #[test]
    fn notices_pass_through_at_any_time() {
        let mut q = ResponseQueue::new();
        assert!(q.on_message(b'N', b"").unwrap().forward);
        q.push(Expect::Execute);
        assert!(q.on_message(b'A', b"").unwrap().forward);
        assert_eq!(q.len(), 1);
    }
}
