//! One consumer group on one topic: members and their leases, the assignment of
//! partitions, and per partition what is delivered, acked, due again or on its way
//! to the dead-letter topic.
//!
//! The state machine is synchronous and takes the time as an argument, so the
//! broker calls it under a short lock and tests drive it on paused time. What the
//! broker must do afterwards (persist an offset, write a dead letter, forget a
//! member, wake waiting fetches) comes back as [`Effects`].
//!
//! Per partition the offsets from `committed` to `next` are each in exactly one of:
//! `acked`, `in_flight`, `redeliver` or `dead`. Offsets below `committed` are done;
//! `next` is the first never delivered.

use shoal_bus::SubscribeOptions;
use shoal_core::{Error, ErrorKind, Origin};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// A member's id, unique within the broker.
pub(crate) type MemberId = u64;

/// Limits of one group (from the broker's config).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupLimits {
    pub(crate) max_members: usize,
    pub(crate) max_in_flight_per_member: u32,
    pub(crate) max_unacked_span: u64,
}

/// A message that failed its last attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) attempts: u32,
    /// The options' dead-letter topic (`None`: `<topic>.dead`).
    pub(crate) topic: Option<String>,
}

/// What the broker must do after a state change.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Committed offsets to persist, `(partition, offset)`, in order.
    pub(crate) commits: Vec<(u32, u64)>,
    /// Messages to append to the dead-letter topic, then report with
    /// [`GroupState::dead_lettered`].
    pub(crate) dead: Vec<DeadLetter>,
    /// Members that left or expired.
    pub(crate) gone: Vec<MemberId>,
    /// Deliveries acked.
    pub(crate) acked: u64,
    /// Something a waiting fetch may care about changed.
    pub(crate) changed: bool,
}

/// A delivery handed out by [`GroupState::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reserved {
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) attempt: u32,
    pub(crate) token: u64,
}

/// The log's bounds of one partition: first offset kept and next to be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) first: u64,
    pub(crate) next: u64,
}

#[derive(Debug)]
struct Member {
    id: MemberId,
    options: SubscribeOptions,
    lease: Duration,
    expires: Instant,
    /// Deliveries it holds unacked, over all partitions.
    in_flight: u32,
    /// Partitions assigned to it, ascending.
    parts: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    member: MemberId,
    attempt: u32,
    deadline: Instant,
    token: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    due: Instant,
    /// Deliveries so far (0 for an offset reserved but never handed out).
    attempts: u32,
    /// The token of the last delivery (0: none), whose late ack still counts.
    token: u64,
}

#[derive(Debug, Default)]
struct Part {
    committed: u64,
    next: u64,
    acked: BTreeSet<u64>,
    in_flight: BTreeMap<u64, InFlight>,
    redeliver: BTreeMap<u64, Pending>,
    dead: BTreeSet<u64>,
}

impl Part {
    fn unacked(&self) -> usize {
        self.in_flight.len() + self.redeliver.len() + self.dead.len()
    }
}

/// The state of one group on one topic.
#[derive(Debug)]
pub(crate) struct GroupState {
    parts: Vec<Part>,
    /// In join order: the order partitions are dealt out in.
    members: Vec<Member>,
    /// Ack deadlines of everything in flight, soonest first.
    deadlines: BTreeSet<(Instant, u32, u64)>,
    next_token: u64,
    limits: GroupLimits,
    /// Options of the latest member to join, for deliveries whose member is gone.
    fallback: SubscribeOptions,
    /// Where the next fetch starts looking, so no partition starves the others.
    rotate: usize,
}

/// Longest any timer of a group runs: options and nack delays are client input,
/// and an `Instant` past the end of time would panic.
const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// `now + d`, with `d` capped at [`MAX_DELAY`].
fn later(now: Instant, d: Duration) -> Instant {
    now + d.min(MAX_DELAY)
}

fn full(what: String) -> Error {
    Error::new(ErrorKind::Overloaded, Origin::Downstream, what).with_retryable(false)
}

impl GroupState {
    /// A group positioned at `positions` (one per partition).
    pub(crate) fn new(positions: &[u64], limits: GroupLimits) -> Self {
        Self {
            parts: positions
                .iter()
                .map(|&o| Part {
                    committed: o,
                    next: o,
                    ..Part::default()
                })
                .collect(),
            members: Vec::new(),
            deadlines: BTreeSet::new(),
            // Random, so a token from before a restart never matches a new one.
            next_token: fastrand::u64(1..u64::MAX / 2),
            limits,
            fallback: SubscribeOptions::default(),
            rotate: 0,
        }
    }

    /// Members now.
    #[cfg(test)]
    pub(crate) fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The partitions assigned to `id`, if it is a member.
    pub(crate) fn assignment(&self, id: MemberId) -> Option<&[u32]> {
        self.member(id).map(|m| &*self.members[m].parts)
    }

    /// `id`'s lease, if it is a member.
    pub(crate) fn lease(&self, id: MemberId) -> Option<Duration> {
        self.member(id).map(|m| self.members[m].lease)
    }

    /// Committed offsets, by partition.
    #[cfg(test)]
    pub(crate) fn committed(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.committed).collect()
    }

    fn member(&self, id: MemberId) -> Option<usize> {
        self.members.iter().position(|m| m.id == id)
    }

    /// Adds a member and rebalances.
    pub(crate) fn join(
        &mut self,
        id: MemberId,
        options: SubscribeOptions,
        lease: Duration,
        now: Instant,
        fx: &mut Effects,
    ) -> Result<(), Error> {
        if self.members.len() >= self.limits.max_members {
            return Err(full(format!(
                "the group has {} members, the most it may have",
                self.limits.max_members
            )));
        }
        self.fallback = options.clone();
        self.members.push(Member {
            id,
            options,
            lease,
            expires: later(now, lease),
            in_flight: 0,
            parts: Vec::new(),
        });
        self.rebalance();
        fx.changed = true;
        Ok(())
    }

    /// Renews `id`'s lease; false if it is not a member.
    pub(crate) fn renew(&mut self, id: MemberId, now: Instant) -> bool {
        match self.member(id) {
            Some(m) => {
                let m = &mut self.members[m];
                m.expires = later(now, m.lease);
                true
            }
            None => false,
        }
    }

    /// Removes `id`; its unacked deliveries count as failed attempts and go back
    /// to be delivered (or dead-lettered). False if it was not a member.
    pub(crate) fn leave(&mut self, id: MemberId, now: Instant, fx: &mut Effects) -> bool {
        let Some(i) = self.member(id) else {
            return false;
        };
        let member = self.members.remove(i);
        let held: Vec<(u32, u64)> = self
            .parts
            .iter()
            .enumerate()
            .flat_map(|(p, part)| {
                part.in_flight
                    .iter()
                    .filter(|(_, f)| f.member == id)
                    .map(move |(o, _)| (p as u32, *o))
            })
            .collect();
        for (p, offset) in held {
            if let Some(f) = self.take_in_flight(p, offset) {
                self.fail(p, offset, f, Duration::ZERO, &member.options, now, fx);
            }
        }
        self.rebalance();
        fx.gone.push(id);
        fx.changed = true;
        true
    }

    /// Expires members whose lease ran out and deliveries whose ack timeout passed.
    pub(crate) fn expire(&mut self, now: Instant, fx: &mut Effects) {
        let expired: Vec<MemberId> = self
            .members
            .iter()
            .filter(|m| m.expires <= now)
            .map(|m| m.id)
            .collect();
        for id in expired {
            self.leave(id, now, fx);
        }
        while let Some(&(deadline, p, offset)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(f) = self.take_in_flight(p, offset) {
                let options = self.options_of(f.member);
                self.fail(p, offset, f, Duration::ZERO, &options, now, fx);
                fx.changed = true;
            }
        }
    }

    /// Hands `id` up to `max` deliveries from its partitions: due redeliveries
    /// first (lowest offset first), then new messages below `bounds[p].next`,
    /// within `max_in_flight` unacked per partition and the member's own limit.
    /// The caller reads the messages and gives back what it could not read with
    /// [`GroupState::unreserve`].
    pub(crate) fn reserve(
        &mut self,
        id: MemberId,
        max: usize,
        now: Instant,
        bounds: &[Bounds],
        fx: &mut Effects,
    ) -> Vec<Reserved> {
        let Some(mi) = self.member(id) else {
            return Vec::new();
        };
        let member = &self.members[mi];
        let parts = member.parts.clone();
        let max_in_flight = member.options.max_in_flight as usize;
        let ack_timeout = Duration::from_millis(member.options.ack_timeout_ms);
        let mut budget = max.min(
            self.limits
                .max_in_flight_per_member
                .saturating_sub(member.in_flight) as usize,
        );
        let mut out = Vec::new();
        if parts.is_empty() {
            return out;
        }
        let start = self.rotate % parts.len();
        self.rotate = self.rotate.wrapping_add(1);
        for k in 0..parts.len() {
            if budget == 0 {
                break;
            }
            let p = parts[(start + k) % parts.len()];
            let Some(b) = bounds.get(p as usize).copied() else {
                continue;
            };
            self.skip_below(p, b.first, fx);
            let part = &mut self.parts[p as usize];
            let due: Vec<(u64, Pending)> = part
                .redeliver
                .iter()
                .filter(|(_, d)| d.due <= now)
                .take(budget)
                .map(|(o, d)| (*o, *d))
                .collect();
            for (offset, d) in due {
                part.redeliver.remove(&offset);
                let r = Reserved {
                    partition: p,
                    offset,
                    attempt: d.attempts + 1,
                    token: self.next_token,
                };
                self.next_token += 1;
                out.push(r);
                budget -= 1;
            }
            while budget > 0
                && part.next < b.next
                && part.unacked() + out.iter().filter(|r| r.partition == p).count() < max_in_flight
                && part.next - part.committed < self.limits.max_unacked_span
            {
                out.push(Reserved {
                    partition: p,
                    offset: part.next,
                    attempt: 1,
                    token: self.next_token,
                });
                self.next_token += 1;
                part.next += 1;
                budget -= 1;
            }
        }
        let deadline = later(now, ack_timeout);
        for r in &out {
            self.parts[r.partition as usize].in_flight.insert(
                r.offset,
                InFlight {
                    member: id,
                    attempt: r.attempt,
                    deadline,
                    token: r.token,
                },
            );
            self.deadlines.insert((deadline, r.partition, r.offset));
        }
        self.members[mi].in_flight += out.len() as u32;
        out
    }

    /// Gives back a reservation that was never handed out (its message could not
    /// be read or did not fit the answer): due again at once, attempt not counted.
    pub(crate) fn unreserve(&mut self, r: &Reserved, now: Instant) {
        let matches = self.parts[r.partition as usize]
            .in_flight
            .get(&r.offset)
            .is_some_and(|f| f.token == r.token);
        if matches {
            self.take_in_flight(r.partition, r.offset);
            self.parts[r.partition as usize].redeliver.insert(
                r.offset,
                Pending {
                    due: now,
                    attempts: r.attempt - 1,
                    token: 0,
                },
            );
        }
    }

    /// Done with a delivery. Applies when the delivery is still in flight under
    /// this token, or waiting for redelivery after it (a late ack saves a
    /// redelivery). Returns whether it applied; an ack of an offset already done
    /// is a no-op.
    pub(crate) fn ack(&mut self, p: u32, offset: u64, token: u64, fx: &mut Effects) -> bool {
        let Some(part) = self.parts.get(p as usize) else {
            return false;
        };
        let in_flight = part.in_flight.get(&offset).map(|f| f.token);
        let waiting = part.redeliver.get(&offset).map(|d| d.token);
        if in_flight == Some(token) {
            self.take_in_flight(p, offset);
        } else if waiting == Some(token) && token != 0 {
            self.parts[p as usize].redeliver.remove(&offset);
        } else {
            return false;
        }
        self.mark_acked(p, offset, fx);
        fx.acked += 1;
        fx.changed = true;
        true
    }

    /// Failed: deliver again after `delay` (the options' backoff when `None`), or
    /// dead-letter it when that was its last attempt. Applies only to a delivery
    /// in flight under this token.
    pub(crate) fn nack(
        &mut self,
        p: u32,
        offset: u64,
        token: u64,
        delay: Option<Duration>,
        now: Instant,
        fx: &mut Effects,
    ) -> bool {
        let held = self
            .parts
            .get(p as usize)
            .and_then(|part| part.in_flight.get(&offset))
            .is_some_and(|f| f.token == token);
        if !held {
            return false;
        }
        let Some(f) = self.take_in_flight(p, offset) else {
            return false;
        };
        let options = self.options_of(f.member);
        let delay = delay.unwrap_or_else(|| options.backoff(f.attempt));
        self.fail(p, offset, f, delay, &options, now, fx);
        fx.changed = true;
        true
    }

    /// The dead letter for `offset` is stored: the message counts as acked.
    pub(crate) fn dead_lettered(&mut self, p: u32, offset: u64, fx: &mut Effects) {
        if let Some(part) = self.parts.get_mut(p as usize) {
            if part.dead.remove(&offset) {
                self.mark_acked(p, offset, fx);
                fx.changed = true;
            }
        }
    }

    /// Moves every partition to `positions` and forgets what was in flight; late
    /// acks of earlier deliveries no longer apply.
    pub(crate) fn seek(&mut self, positions: &[u64], fx: &mut Effects) {
        for (p, (part, &pos)) in self.parts.iter_mut().zip(positions).enumerate() {
            *part = Part {
                committed: pos,
                next: pos,
                ..Part::default()
            };
            fx.commits.push((p as u32, pos));
        }
        self.deadlines.clear();
        for m in &mut self.members {
            m.in_flight = 0;
        }
        fx.changed = true;
    }

    /// Retention deleted everything below `first`: a position there continues from
    /// `first`.
    pub(crate) fn skip_below(&mut self, p: u32, first: u64, fx: &mut Effects) {
        let Some(part) = self.parts.get_mut(p as usize) else {
            return;
        };
        if part.committed >= first {
            return;
        }
        part.committed = first;
        part.next = part.next.max(first);
        part.acked = part.acked.split_off(&first);
        part.redeliver = part.redeliver.split_off(&first);
        part.dead = part.dead.split_off(&first);
        let gone: Vec<u64> = part.in_flight.range(..first).map(|(o, _)| *o).collect();
        for o in gone {
            self.take_in_flight(p, o);
        }
        fx.commits.push((p, first));
        fx.changed = true;
    }

    /// Messages stored but not acked, over all partitions.
    pub(crate) fn lag(&self, bounds: &[Bounds]) -> u64 {
        self.parts
            .iter()
            .zip(bounds)
            .map(|(part, b)| {
                let from = part.committed.max(b.first);
                let acked = part.acked.range(from..b.next).count() as u64;
                b.next.saturating_sub(from).saturating_sub(acked)
            })
            .sum()
    }

    /// When something changes by itself: an ack timeout, a redelivery falling due
    /// on `member`'s partitions (all partitions for `None`), a lease running out
    /// (for `None` only).
    pub(crate) fn next_wakeup(&self, member: Option<MemberId>) -> Option<Instant> {
        let mut at = self.deadlines.first().map(|d| d.0);
        let mut consider = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        let parts: Vec<u32> = match member {
            Some(id) => self.assignment(id).map(<[u32]>::to_vec).unwrap_or_default(),
            None => {
                for m in &self.members {
                    consider(m.expires);
                }
                (0..self.parts.len() as u32).collect()
            }
        };
        for p in parts {
            if let Some(d) = self.parts[p as usize]
                .redeliver
                .values()
                .map(|d| d.due)
                .min()
            {
                consider(d);
            }
        }
        at
    }

    fn options_of(&self, member: MemberId) -> SubscribeOptions {
        self.member(member).map_or_else(
            || self.fallback.clone(),
            |m| self.members[m].options.clone(),
        )
    }

    fn take_in_flight(&mut self, p: u32, offset: u64) -> Option<InFlight> {
        let f = self.parts[p as usize].in_flight.remove(&offset)?;
        self.deadlines.remove(&(f.deadline, p, offset));
        if let Some(m) = self.member(f.member) {
            let m = &mut self.members[m];
            m.in_flight = m.in_flight.saturating_sub(1);
        }
        Some(f)
    }

    #[allow(clippy::too_many_arguments)]
    fn fail(
        &mut self,
        p: u32,
        offset: u64,
        f: InFlight,
        delay: Duration,
        options: &SubscribeOptions,
        now: Instant,
        fx: &mut Effects,
    ) {
        let part = &mut self.parts[p as usize];
        if f.attempt >= options.max_deliveries {
            part.dead.insert(offset);
            fx.dead.push(DeadLetter {
                partition: p,
                offset,
                attempts: f.attempt,
                topic: options.dead_letter_topic.clone(),
            });
        } else {
            part.redeliver.insert(
                offset,
                Pending {
                    due: later(now, delay),
                    attempts: f.attempt,
                    token: f.token,
                },
            );
        }
    }

    fn mark_acked(&mut self, p: u32, offset: u64, fx: &mut Effects) {
        let part = &mut self.parts[p as usize];
        if offset < part.committed {
            return;
        }
        part.acked.insert(offset);
        let before = part.committed;
        while part.acked.remove(&part.committed) {
            part.committed += 1;
        }
        if part.committed != before {
            fx.commits.push((p, part.committed));
        }
    }

    /// Deals partitions round-robin over the members in join order. A partition
    /// that moves keeps its deliveries in flight with their holder, whose acks
    /// still count; with `max_in_flight` 1 the new owner waits for them, so order
    /// holds across the move.
    fn rebalance(&mut self) {
        for m in &mut self.members {
            m.parts.clear();
        }
        let n = self.members.len();
        if n == 0 {
            return;
        }
        for p in 0..self.parts.len() {
            self.members[p % n].parts.push(p as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: GroupLimits = GroupLimits {
        max_members: 3,
        max_in_flight_per_member: 100,
        max_unacked_span: 1000,
    };

    fn opts(max_in_flight: u32) -> SubscribeOptions {
        SubscribeOptions {
            max_in_flight,
            ack_timeout_ms: 1000,
            max_deliveries: 3,
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            ..Default::default()
        }
    }

    fn bounds(next: &[u64]) -> Vec<Bounds> {
        next.iter().map(|&n| Bounds { first: 0, next: n }).collect()
    }

    fn offsets(r: &[Reserved]) -> Vec<(u32, u64, u32)> {
        r.iter()
            .map(|r| (r.partition, r.offset, r.attempt))
            .collect()
    }

    fn group(parts: usize) -> (GroupState, Effects) {
        (GroupState::new(&vec![0; parts], LIMITS), Effects::default())
    }

    const LEASE: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn ack_timeout_redelivers_with_the_next_attempt() {
        let (mut g, mut fx) = group(1);
        g.join(1, opts(10), LEASE, Instant::now(), &mut fx).unwrap();
        let b = bounds(&[2]);
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(0, 0, 1), (0, 1, 1)]);
        assert!(g.ack(0, 1, r[1].token, &mut fx));
        // Offset 0 unacked: nothing committed yet, offset 1 waits in the acked set.
        assert!(fx.commits.is_empty());
        assert_eq!(
            g.next_wakeup(Some(1)),
            Some(Instant::now() + Duration::from_secs(1))
        );

        tokio::time::advance(Duration::from_millis(999)).await;
        g.expire(Instant::now(), &mut fx);
        assert!(g.reserve(1, 10, Instant::now(), &b, &mut fx).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        g.expire(Instant::now(), &mut fx);
        let again = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&again), vec![(0, 0, 2)]);
        // The first delivery's token no longer applies once redelivered.
        assert!(!g.ack(0, 0, r[0].token, &mut fx));
        assert!(g.ack(0, 0, again[0].token, &mut fx));
        assert_eq!(fx.commits, vec![(0, 2)]);
        assert_eq!(g.lag(&b), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn nack_waits_for_backoff_or_the_given_delay() {
        let (mut g, mut fx) = group(1);
        g.join(1, opts(1), LEASE, Instant::now(), &mut fx).unwrap();
        let b = bounds(&[5]);
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(0, 0, 1)]);
        assert!(g.nack(0, 0, r[0].token, None, Instant::now(), &mut fx));
        // max_in_flight 1: the nacked message blocks the partition until it is due.
        assert!(g.reserve(1, 10, Instant::now(), &b, &mut fx).is_empty());
        assert_eq!(
            g.next_wakeup(Some(1)),
            Some(Instant::now() + Duration::from_millis(100))
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(0, 0, 2)]);
        // Second failure: backoff(2) = 200 ms, unless a delay is given.
        assert!(g.nack(
            0,
            0,
            r[0].token,
            Some(Duration::from_millis(30)),
            Instant::now(),
            &mut fx
        ));
        tokio::time::advance(Duration::from_millis(29)).await;
        assert!(g.reserve(1, 10, Instant::now(), &b, &mut fx).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(0, 0, 3)]);
        // A nack with a stale token does nothing.
        assert!(!g.nack(0, 0, r[0].token + 1, None, Instant::now(), &mut fx));
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_failed_attempt_goes_to_the_dead_letter_topic() {
        let (mut g, mut fx) = group(1);
        let o = SubscribeOptions {
            dead_letter_topic: Some("poison".into()),
            ..opts(1)
        };
        g.join(1, o, LEASE, Instant::now(), &mut fx).unwrap();
        let b = bounds(&[2]);
        for attempt in 1..=3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
            assert_eq!(offsets(&r), vec![(0, 0, attempt)]);
            if attempt < 3 {
                assert!(g.nack(0, 0, r[0].token, None, Instant::now(), &mut fx));
                assert!(fx.dead.is_empty());
            } else {
                // The last attempt times out instead.
                tokio::time::advance(Duration::from_secs(1)).await;
                g.expire(Instant::now(), &mut fx);
            }
        }
        assert_eq!(
            fx.dead,
            vec![DeadLetter {
                partition: 0,
                offset: 0,
                attempts: 3,
                topic: Some("poison".into())
            }]
        );
        // Still unacked until the dead letter is stored: the partition waits.
        assert!(g.reserve(1, 10, Instant::now(), &b, &mut fx).is_empty());
        assert_eq!(g.lag(&b), 2);
        g.dead_lettered(0, 0, &mut fx);
        assert_eq!(fx.commits, vec![(0, 1)]);
        assert_eq!(
            offsets(&g.reserve(1, 10, Instant::now(), &b, &mut fx)),
            vec![(0, 1, 1)]
        );
        assert_eq!(g.lag(&b), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_move_on_join_leave_and_lease_expiry() {
        let (mut g, mut fx) = group(4);
        let now = Instant::now();
        g.join(10, opts(10), LEASE, now, &mut fx).unwrap();
        assert_eq!(g.assignment(10), Some(&[0, 1, 2, 3][..]));
        g.join(20, opts(10), Duration::from_secs(2), now, &mut fx)
            .unwrap();
        assert_eq!(g.assignment(10), Some(&[0, 2][..]));
        assert_eq!(g.assignment(20), Some(&[1, 3][..]));
        g.join(30, opts(10), LEASE, now, &mut fx).unwrap();
        assert_eq!(g.assignment(30), Some(&[2][..]));
        assert!(
            g.join(40, opts(10), LEASE, now, &mut fx).is_err(),
            "max_members is 3"
        );

        // Member 20 takes a delivery, then stops renewing its lease.
        let b = bounds(&[0, 1, 0, 0]);
        let r = g.reserve(20, 10, now, &b, &mut fx);
        assert_eq!(offsets(&r), vec![(1, 0, 1)]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(g.renew(10, Instant::now()) && g.renew(30, Instant::now()));
        g.expire(Instant::now(), &mut fx);
        assert_eq!(g.member_count(), 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        g.expire(Instant::now(), &mut fx);
        assert_eq!(fx.gone, vec![20]);
        assert_eq!(g.member_count(), 2);
        assert_eq!(g.assignment(10), Some(&[0, 2][..]));
        assert_eq!(g.assignment(30), Some(&[1, 3][..]));
        // Its unacked delivery goes to the new owner of partition 1 at once.
        let r = g.reserve(30, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(1, 0, 2)]);

        assert!(g.leave(10, Instant::now(), &mut fx));
        assert!(!g.leave(10, Instant::now(), &mut fx));
        assert_eq!(g.assignment(30), Some(&[0, 1, 2, 3][..]));
        assert!(!g.renew(20, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_partition_keeps_order_with_max_in_flight_one() {
        let (mut g, mut fx) = group(2);
        g.join(1, opts(1), LEASE, Instant::now(), &mut fx).unwrap();
        let b = bounds(&[0, 3]);
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(1, 0, 1)]);
        g.join(2, opts(1), LEASE, Instant::now(), &mut fx).unwrap();
        assert_eq!(g.assignment(2), Some(&[1][..]));
        // The new owner waits until the old holder acks offset 0.
        assert!(g.reserve(2, 10, Instant::now(), &b, &mut fx).is_empty());
        assert!(g.ack(1, 0, r[0].token, &mut fx));
        let r = g.reserve(2, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(1, 1, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn max_in_flight_and_the_member_limit_bound_deliveries() {
        let limits = GroupLimits {
            max_in_flight_per_member: 5,
            ..LIMITS
        };
        let mut g = GroupState::new(&[0, 0], limits);
        let mut fx = Effects::default();
        g.join(1, opts(3), LEASE, Instant::now(), &mut fx).unwrap();
        let b = bounds(&[10, 10]);
        let r = g.reserve(1, 100, Instant::now(), &b, &mut fx);
        assert_eq!(r.len(), 5, "member limit");
        let per_part = |p| r.iter().filter(|r| r.partition == p).count();
        assert!(per_part(0) <= 3 && per_part(1) <= 3);
        assert!(g.reserve(1, 100, Instant::now(), &b, &mut fx).is_empty());
        // Out-of-order ack frees a slot but commits nothing.
        let last = r.iter().rfind(|r| r.partition == 0).copied().unwrap();
        assert!(g.ack(0, last.offset, last.token, &mut fx));
        assert!(fx.commits.is_empty() || last.offset == 0);
        let more = g.reserve(1, 100, Instant::now(), &b, &mut fx);
        assert_eq!(more.len(), 1);
        // Acking everything commits up to the first never-delivered offset.
        for x in r.iter().chain(&more) {
            g.ack(x.partition, x.offset, x.token, &mut fx);
        }
        let c = g.committed();
        assert_eq!(c[0] + c[1], 6);
        assert_eq!(g.lag(&b), 14);
    }

    #[tokio::test(start_paused = true)]
    async fn seek_moves_positions_and_drops_what_was_in_flight() {
        let (mut g, mut fx) = group(1);
        g.join(1, opts(10), LEASE, Instant::now(), &mut fx).unwrap();
        let b = bounds(&[10]);
        let r = g.reserve(1, 3, Instant::now(), &b, &mut fx);
        assert_eq!(r.len(), 3);
        let mut fx = Effects::default();
        g.seek(&[7], &mut fx);
        assert_eq!(fx.commits, vec![(0, 7)]);
        assert!(
            !g.ack(0, 0, r[0].token, &mut fx),
            "late ack of a dropped delivery"
        );
        assert_eq!(g.lag(&b), 3);
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(0, 7, 1), (0, 8, 1), (0, 9, 1)]);
        // Nothing times out from before the seek.
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut fx = Effects::default();
        g.expire(Instant::now(), &mut fx);
        g.seek(&[0], &mut fx);
        assert_eq!(g.lag(&b), 10);
        assert_eq!(g.reserve(1, 1, Instant::now(), &b, &mut fx)[0].offset, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retention_moves_positions_forward() {
        let (mut g, mut fx) = group(1);
        g.join(1, opts(10), LEASE, Instant::now(), &mut fx).unwrap();
        let r = g.reserve(1, 2, Instant::now(), &bounds(&[10]), &mut fx);
        assert_eq!(r.len(), 2);
        let b = [Bounds { first: 5, next: 10 }];
        assert_eq!(g.lag(&b), 5);
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(r[0].offset, 5);
        assert_eq!(fx.commits, vec![(0, 5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_timeouts_and_delays_are_capped_not_a_panic() {
        let (mut g, mut fx) = group(1);
        let o = SubscribeOptions {
            ack_timeout_ms: u64::MAX,
            backoff_initial_ms: u64::MAX,
            backoff_max_ms: u64::MAX,
            ..opts(10)
        };
        g.join(1, o, Duration::MAX, Instant::now(), &mut fx)
            .unwrap();
        let r = g.reserve(1, 2, Instant::now(), &bounds(&[2]), &mut fx);
        assert!(g.nack(0, 0, r[0].token, None, Instant::now(), &mut fx));
        assert!(g.nack(
            0,
            1,
            r[1].token,
            Some(Duration::MAX),
            Instant::now(),
            &mut fx
        ));
        assert_eq!(g.next_wakeup(None), Some(Instant::now() + MAX_DELAY));
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_returns_deliveries_and_unreserve_does_not_count_an_attempt() {
        let (mut g, mut fx) = group(1);
        g.join(1, opts(10), LEASE, Instant::now(), &mut fx).unwrap();
        g.join(2, opts(10), LEASE, Instant::now(), &mut fx).unwrap();
        let b = bounds(&[2]);
        let r = g.reserve(1, 10, Instant::now(), &b, &mut fx);
        assert_eq!(r.len(), 2);
        g.unreserve(&r[1], Instant::now());
        assert!(g.leave(1, Instant::now(), &mut fx));
        let r = g.reserve(2, 10, Instant::now(), &b, &mut fx);
        assert_eq!(offsets(&r), vec![(0, 0, 2), (0, 1, 1)]);
    }
}
