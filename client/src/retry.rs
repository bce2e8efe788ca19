//! When to retry a request, and how long to wait first.
//!
//! Failures of one attempt fall into five kinds (`Failure`):
//!
//! | kind | seen as | applied? |
//! |---|---|---|
//! | stale route | 421 | no: the shard refused it at apply time |
//! | range moving | 503 `range_moving` | no: a split is cutting the range over |
//! | unavailable | 503 (`unavailable`, anything else) | no |
//! | unreachable | connection refused / connect timeout | no: nothing was sent |
//! | no answer | timeout or reset after sending, 504 | **unknown** |
//!
//! Every other answer (400, 404, 409, 413, 500...) is final and never
//! retried. The first four kinds are always safe to retry. "No answer" is
//! safe for reads only. A write (put or delete, conditional or not) that
//! got no answer is **never replayed**: every write bumps the key's
//! version, so a replay is a second write, not the same one again (client
//! A's lost `put(x, 1)` applied at v1, B's `put(x, 2)` at v2, A's replay at
//! v3: a reader sees (1, v1), then (1, v3), which no order of the three
//! writes explains; a replayed delete removes B's acknowledged write). The
//! client reports such a write as [`crate::Error::Indeterminate`] at once
//! and leaves it to the caller to read the key back. The same goes for a
//! write answered with a 5xx other than 503 (500, 502...): the server may
//! have failed after applying it.
//!
//! A few admin requests ask for a *state* rather than a change (a leader
//! transfer, the cancel of an operation): asking twice is the same as
//! asking once, so they are replayed after "no answer" (`Idempotent`). If a
//! later attempt then gets an error answer, that answer is not trusted
//! either (the first attempt may have done it): the request reports
//! [`crate::Error::Indeterminate`] (`ambiguous_answer`).
//!
//! Delays grow exponentially from [`RetryPolicy::min_backoff`] to
//! [`RetryPolicy::max_backoff`] with "equal jitter" (half fixed, half random)
//! so that many clients failing together do not retry in lock step. A
//! server's `Retry-After` is a lower bound. Retrying stops after
//! [`RetryPolicy::max_retries`] or when the next wait would cross the
//! request's deadline.
//!
//! A `range_moving` answer is different: the range is frozen for a split's
//! cutover, which lasts milliseconds, and the leader is healthy. Waiting
//! tens of milliseconds (let alone a second) would turn a short pause into a
//! long one, so these retries start at [`RetryPolicy::moving_backoff`] (a few
//! milliseconds), grow only to [`RetryPolicy::moving_max_backoff`], ignore
//! `Retry-After`, and do not use up `max_retries`: only the deadline bounds
//! them (the server gives up on a stuck cutover by itself).
//!
//! Everything here is pure; the randomness is passed in.

use std::time::Duration;

use cleave_metadata::api::ErrorCode;

/// Bounds on retrying one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = never retry).
    pub max_retries: u32,
    /// Base delay before the first retry.
    pub min_backoff: Duration,
    /// Largest delay between two attempts (before `Retry-After`).
    pub max_backoff: Duration,
    /// Base delay before retrying a `range_moving` answer.
    pub moving_backoff: Duration,
    /// Largest delay between two retries of a `range_moving` answer.
    pub moving_max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 12,
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            moving_backoff: Duration::from_millis(2),
            moving_max_backoff: Duration::from_millis(50),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (0 for the first retry), with
    /// `jitter` in `[0, 1)`: between half and all of
    /// `min(max_backoff, min_backoff * 2^retry)`.
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        equal_jitter(self.min_backoff, self.max_backoff, retry, jitter)
    }

    /// How long to wait before retrying a `range_moving` answer, given how
    /// many such retries this request already made and the time left; `None`
    /// means the deadline would be crossed. See the module docs.
    pub fn next_moving_delay(&self, moving_retries_done: u32, remaining: Duration, jitter: f64) -> Option<Duration> {
        let delay = equal_jitter(self.moving_backoff, self.moving_max_backoff, moving_retries_done, jitter);
        (delay < remaining).then_some(delay)
    }

    /// How long to wait before the next attempt, given the retries already
    /// made, the server's `Retry-After` and the time left before the
    /// deadline; `None` means give up now.
    pub fn next_delay(
        &self,
        retries_done: u32,
        retry_after: Option<Duration>,
        remaining: Duration,
        jitter: f64,
    ) -> Option<Duration> {
        if retries_done >= self.max_retries {
            return None;
        }
        let delay = self.backoff(retries_done, jitter).max(retry_after.unwrap_or_default());
        (delay < remaining).then_some(delay)
    }
}

/// Between half and all of `min(max, min * 2^retry)` (never below `min`).
fn equal_jitter(min: Duration, max: Duration, retry: u32, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(retry.min(31));
    let base = min.saturating_mul(factor).min(max).max(min);
    let half = base / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Parses a `Retry-After` header given in seconds (the HTTP-date form is
/// not used by CleaveDB and is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64)
}

/// What a request does, which decides what may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// Reads, scans, admin calls.
    Read,
    /// A put without `if_version`.
    Put,
    /// A delete without `if_version`.
    Delete,
    /// A put or delete with `if_version` (compare-and-set), or an admin
    /// request that starts something (a split, a move).
    Conditional,
    /// An admin request whose repetition is harmless (it asks for a state:
    /// a leader transfer, the cancel of an operation).
    Idempotent,
}

impl RequestKind {
    /// Whether the request changes data, so that a lost answer leaves its
    /// outcome unknown.
    pub(crate) fn is_write(self) -> bool {
        matches!(self, RequestKind::Put | RequestKind::Delete | RequestKind::Conditional)
    }
}

/// Why one attempt failed, when the failure may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// 421: the request reached a shard that no longer owns the key.
    StaleRoute,
    /// 503: no leader, no quorum.
    Unavailable,
    /// 503 `range_moving`: a split is cutting the key's range over.
    RangeMoving,
    /// The connection could not be opened: nothing was sent.
    Unreachable,
    /// Sent, but no answer came (timeout, reset) or the server said 504.
    NoAnswer,
}

/// The retryable failure an HTTP status (with the error code of its body,
/// if any) means; `None` for a final answer.
pub(crate) fn classify_status(status: u16, code: Option<ErrorCode>) -> Option<Failure> {
    match status {
        421 => Some(Failure::StaleRoute),
        503 if code == Some(ErrorCode::RangeMoving) => Some(Failure::RangeMoving),
        // Only a CleaveDB error body proves the request was refused before
        // anything was applied; a bare 503 may be a proxy's, after its
        // upstream took the request and then went away.
        503 if code.is_some() => Some(Failure::Unavailable),
        503 => Some(Failure::NoAnswer),
        504 => Some(Failure::NoAnswer),
        _ => None,
    }
}

/// What to do after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Try again (if the budget allows). `maybe_applied` records that the
    /// failed attempt might have taken effect.
    Retry { maybe_applied: bool },
    /// Stop and report [`crate::Error::Indeterminate`].
    Indeterminate,
}

/// Decides between retrying and reporting an unknown outcome.
pub(crate) fn after_failure(kind: RequestKind, failure: Failure) -> Step {
    match (failure, kind) {
        (Failure::StaleRoute | Failure::Unavailable | Failure::RangeMoving | Failure::Unreachable, _) => {
            Step::Retry { maybe_applied: false }
        }
        (Failure::NoAnswer, RequestKind::Read) => Step::Retry { maybe_applied: false },
        (Failure::NoAnswer, RequestKind::Idempotent) => Step::Retry { maybe_applied: true },
        (Failure::NoAnswer, RequestKind::Put | RequestKind::Delete | RequestKind::Conditional) => Step::Indeterminate,
    }
}

/// Whether a final answer cannot be trusted because an earlier attempt may
/// have been applied: after a maybe-applied attempt, any error answer (a
/// 404, a 409, a 400...) may be the consequence of that attempt.
pub(crate) fn ambiguous_answer(status: u16, maybe_applied: bool) -> bool {
    maybe_applied && !(200..300).contains(&status)
}

/// Whether a final error answer to a write leaves its outcome unknown: a
/// 5xx other than 503 (which the API defines as "not applied") may come
/// from a server that failed after applying the write.
pub(crate) fn write_outcome_unknown(kind: RequestKind, status: u16) -> bool {
    kind.is_write() && status >= 500 && status != 503
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy { max_retries: 5, min_backoff: ms(100), max_backoff: ms(1000), ..RetryPolicy::default() }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_equal_jitter() {
        let p = policy();
        assert_eq!(p.backoff(0, 0.0), ms(50));
        assert_eq!(p.backoff(0, 1.0), ms(100));
        assert_eq!(p.backoff(1, 0.0), ms(100));
        assert_eq!(p.backoff(2, 0.5), ms(300));
        assert_eq!(p.backoff(3, 0.999).as_millis(), 799);
        assert_eq!(p.backoff(4, 1.0), ms(1000), "capped");
        assert_eq!(p.backoff(1000, 1.0), ms(1000), "no overflow");
        assert_eq!(p.backoff(0, 7.0), ms(100), "jitter is clamped");
        for retry in 0..40 {
            for j in [0.0, 0.25, 0.5, 0.99] {
                let d = p.backoff(retry, j);
                assert!(d >= ms(50) && d <= ms(1000), "{retry} {j} {d:?}");
            }
        }
    }

    #[test]
    fn backoff_never_drops_below_min_when_min_exceeds_max() {
        let p = RetryPolicy { max_retries: 1, min_backoff: ms(200), max_backoff: ms(10), ..RetryPolicy::default() };
        assert_eq!(p.backoff(0, 1.0), ms(200));
    }

    #[test]
    fn next_delay_respects_budget_deadline_and_retry_after() {
        let p = policy();
        let plenty = Duration::from_secs(60);
        assert_eq!(p.next_delay(0, None, plenty, 0.0), Some(ms(50)));
        assert_eq!(p.next_delay(4, None, plenty, 1.0), Some(ms(1000)));
        assert_eq!(p.next_delay(5, None, plenty, 0.0), None, "budget spent");
        assert_eq!(p.next_delay(0, Some(ms(2000)), plenty, 0.0), Some(ms(2000)), "Retry-After is a floor");
        assert_eq!(p.next_delay(3, Some(ms(10)), plenty, 0.0), Some(ms(400)));
        assert_eq!(p.next_delay(0, None, ms(40), 0.0), None, "would cross the deadline");
        assert_eq!(p.next_delay(0, Some(ms(2000)), ms(1500), 0.0), None);
        assert_eq!(RetryPolicy { max_retries: 0, ..p }.next_delay(0, None, plenty, 0.0), None);
    }

    #[test]
    fn retry_after_parses_seconds() {
        assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("0.25"), Some(ms(250)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn range_moving_is_retried_within_milliseconds_whatever_the_budget() {
        let p = RetryPolicy::default();
        let plenty = Duration::from_secs(10);
        assert_eq!(p.next_moving_delay(0, plenty, 0.0), Some(ms(1)));
        assert_eq!(p.next_moving_delay(0, plenty, 1.0), Some(ms(2)));
        assert_eq!(p.next_moving_delay(3, plenty, 1.0), Some(ms(16)));
        assert_eq!(p.next_moving_delay(100, plenty, 1.0), Some(ms(50)), "capped well below a second");
        // not bounded by max_retries, only by the deadline
        assert!(p.next_moving_delay(p.max_retries + 50, plenty, 0.5).is_some());
        assert_eq!(p.next_moving_delay(10, ms(20), 1.0), None);
        // the first few retries together stay within a typical cutover
        let total: Duration = (0..5).map(|r| p.next_moving_delay(r, plenty, 1.0).unwrap()).sum();
        assert!(total <= ms(62), "{total:?}");
    }

    #[test]
    fn only_421_503_504_are_retryable_statuses() {
        assert_eq!(classify_status(421, Some(ErrorCode::StaleRoute)), Some(Failure::StaleRoute));
        assert_eq!(classify_status(503, None), Some(Failure::NoAnswer), "a bare 503 proves nothing");
        assert_eq!(classify_status(503, Some(ErrorCode::Unavailable)), Some(Failure::Unavailable));
        assert_eq!(classify_status(503, Some(ErrorCode::RangeMoving)), Some(Failure::RangeMoving));
        assert_eq!(classify_status(504, None), Some(Failure::NoAnswer));
        for s in [200, 400, 404, 409, 413, 500, 502] {
            assert_eq!(classify_status(s, None), None, "{s}");
            assert_eq!(classify_status(s, Some(ErrorCode::RangeMoving)), None, "{s}");
        }
    }

    #[test]
    fn writes_are_never_replayed_after_no_answer() {
        use RequestKind::*;
        for kind in [Read, Put, Delete, Conditional, Idempotent] {
            for f in [Failure::StaleRoute, Failure::Unavailable, Failure::RangeMoving, Failure::Unreachable] {
                assert_eq!(after_failure(kind, f), Step::Retry { maybe_applied: false }, "{kind:?} {f:?}");
            }
        }
        assert_eq!(after_failure(Read, Failure::NoAnswer), Step::Retry { maybe_applied: false });
        assert_eq!(after_failure(Put, Failure::NoAnswer), Step::Indeterminate);
        assert_eq!(after_failure(Delete, Failure::NoAnswer), Step::Indeterminate);
        assert_eq!(after_failure(Conditional, Failure::NoAnswer), Step::Indeterminate);
        assert_eq!(after_failure(Idempotent, Failure::NoAnswer), Step::Retry { maybe_applied: true });
    }

    #[test]
    fn an_error_after_a_maybe_applied_attempt_is_ambiguous() {
        for status in [400, 404, 409, 500, 504] {
            assert!(ambiguous_answer(status, true), "{status}");
            assert!(!ambiguous_answer(status, false), "{status}");
        }
        assert!(!ambiguous_answer(200, true));
    }

    #[test]
    fn a_5xx_other_than_503_leaves_a_write_unknown() {
        use RequestKind::*;
        for kind in [Put, Delete, Conditional] {
            assert!(write_outcome_unknown(kind, 500), "{kind:?}");
            assert!(write_outcome_unknown(kind, 502), "{kind:?}");
            assert!(!write_outcome_unknown(kind, 503), "{kind:?}");
            assert!(!write_outcome_unknown(kind, 409), "{kind:?}");
        }
        assert!(!write_outcome_unknown(Read, 500));
        assert!(!write_outcome_unknown(Idempotent, 500));
    }
}
