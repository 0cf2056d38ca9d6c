//! The simulated network: connections as pairs of in-order queues, delivered, delayed, lost
//! or left half-open as the scheduler decides.

use super::*;

impl Sim {
    /// Ends a connection: the client hears of it at once; frames already on their way to the
    /// relay may still arrive (half-open) unless the relay is gone.
    pub(crate) fn close_link(&mut self, l: usize) {
        let link = &mut self.links[l];
        if !link.live {
            return;
        }
        link.live = false;
        link.down.clear();
        let node = link.node;
        if self.nodes[node].link == Some(l) {
            self.nodes[node].link = None;
            self.nodes[node].client.disconnected();
            self.nodes[node].lease_pending = false;
        }
    }

    pub(crate) fn connect(&mut self, i: usize) {
        let node = &self.nodes[i];
        if node.link.is_some()
            || node.replica.is_none()
            || node.cut_until > self.step
            || self.shared.is_none()
        {
            return;
        }
        let expired = std::mem::take(&mut self.nodes[i].stale_token);
        let reads = self.reads(i);
        let writes: Vec<String> = if self.nodes[i].narrow_until > self.step {
            reads
                .iter()
                .filter(|s| *s != "list:shared")
                .cloned()
                .collect()
        } else {
            reads.clone()
        };
        let tok = token(
            &format!("n{i}"),
            &reads,
            &writes,
            self.nodes[i].primary,
            expired,
        );
        let Some(hello) = self.with_replica(i, "hello", |r, node| node.client.start(r, &tok))
        else {
            return;
        };
        self.links.push(Link {
            node: i,
            live: true,
            relay_closed: false,
            ep: None,
            up: VecDeque::from([hello]),
            down: VecDeque::new(),
        });
        self.nodes[i].link = Some(self.links.len() - 1);
        let _ = writeln!(
            self.trace,
            "{:>5} connect node {i}{}",
            self.step,
            if expired { " (expired token)" } else { "" }
        );
    }

    /// Whether the relay reads link `l` now: a frame waits and its answers have room (the
    /// relay stops reading a client that does not read its answers).
    pub(crate) fn relay_reads(&self, l: usize) -> bool {
        let k = &self.links[l];
        !k.up.is_empty() && (k.down.len() < self.cap || !k.live || k.relay_closed)
    }

    /// The relay reads one frame of link `l`.
    pub(crate) fn deliver_up(&mut self, l: usize) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if self.links[l].relay_closed {
            self.links[l].up.clear();
            return;
        }
        let Some(msg) = self.links[l].up.pop_front() else {
            return;
        };
        if let ClientMsg::Push { .. } = &msg {
            self.seen_pushes.push((self.links[l].node, msg.clone()));
        }
        let kind = msg.kind();
        let result: Result<Vec<ServerMsg>, Close> = self.rt.block_on(async {
            match self.links[l].ep.as_mut() {
                None => match Endpoint::open(&shared, msg).await {
                    Ok((ep, welcome)) => {
                        self.links[l].ep = Some(ep);
                        Ok(vec![welcome])
                    }
                    Err(c) => Err(c),
                },
                Some(ep) => ep.handle(msg).await,
            }
        });
        let node = self.links[l].node;
        let _ = writeln!(
            self.trace,
            "{:>5} relay <- node {node} {kind} (link {l}){}",
            self.step,
            match &result {
                Err(c) => format!(" closed: {:?} {}", c.code, c.message),
                Ok(_) => String::new(),
            }
        );
        match result {
            Ok(replies) => {
                if self.links[l].live {
                    self.links[l].down.extend(replies);
                }
            }
            Err(close) => {
                if self.links[l].live {
                    self.links[l].down.push_back(ServerMsg::Error {
                        code: close.code,
                        message: close.message,
                    });
                }
                self.links[l].up.clear();
                self.links[l].ep = None;
                self.links[l].relay_closed = true;
            }
        }
    }

    /// The client of link `l` reads one frame.
    pub(crate) fn deliver_down(&mut self, l: usize) {
        let node = self.links[l].node;
        if !self.links[l].live || self.nodes[node].link != Some(l) {
            return;
        }
        let Some(msg) = self.links[l].down.pop_front() else {
            return;
        };
        let is_error = matches!(msg, ServerMsg::Error { .. });
        let kind = match &msg {
            ServerMsg::Refused {
                origin_seq,
                code,
                message,
                ..
            } => {
                format!("refused {origin_seq} {code:?} {message}")
            }
            ServerMsg::Error { code, message } => format!("error {code:?} {message}"),
            ServerMsg::Changes {
                after,
                up_to,
                change_sets,
                ..
            } => {
                format!("changes ({after}, {up_to}] {} sets", change_sets.len())
            }
            ServerMsg::Acks { acks } => format!("acks {acks:?}"),
            ServerMsg::Snapshot {
                position,
                rows,
                done,
                ..
            } => format!("snapshot at {position}, {} rows, done={done}", rows.len()),
            other => format!("{:?}", std::mem::discriminant(other)),
        };
        let out = self.with_replica(node, "handle", |r, n| {
            let step = n.client.handle(r, msg);
            Ok(step)
        });
        let _ = writeln!(self.trace, "{:>5} node {node} <- {kind}", self.step);
        let Some(step) = out else { return };
        match step {
            Ok(step) => {
                if let Some((_, outcome)) = step.lease {
                    let n = &mut self.nodes[node];
                    n.lease_pending = false;
                    match outcome {
                        LeaseOutcome::Granted { token, .. } => n.lease = Some(token),
                        LeaseOutcome::Released { .. } | LeaseOutcome::Lost { .. } => n.lease = None,
                        LeaseOutcome::Busy { .. } => {}
                        LeaseOutcome::Forbidden { name } => panic!(
                            "seed {}: lease {name} refused to a token with every grant\n{}",
                            self.seed, self.trace
                        ),
                    }
                }
                if let Some(refused) = step.refused {
                    panic!(
                        "seed {}: node {node} push refused for good: {refused:?}\n{}",
                        self.seed, self.trace
                    );
                }
                // Only a narrowed token lacks a grant, and no set nears a limit: any other
                // permanent refusal (which the client quarantines and pushes on) is a bug.
                if !step.quarantined.is_empty() {
                    assert!(
                        self.nodes[node].narrow_until != 0,
                        "seed {}: node {node} had change sets {:?} quarantined\n{}",
                        self.seed,
                        step.quarantined,
                        self.trace
                    );
                    self.note(
                        "quarantined",
                        format!("node {node}: {:?}", step.quarantined),
                    );
                }
                // Downloads paused at a change from a newer app schema (the documented policy:
                // until the app is upgraded). The client keeps such a connection up (uploads
                // go on): odd seeds do so; even seeds drop the link at each pause, the
                // schedules they were drawn with before the client kept it.
                // `FERRY_SIM_OUTDATED=stay|drop` sets one mode for every seed.
                let paused = self.nodes[node].client.schema_outdated().is_some();
                let stay = match std::env::var("FERRY_SIM_OUTDATED").as_deref() {
                    Ok("stay") => true,
                    Ok("drop") => false,
                    _ => self.seed % 2 == 1,
                };
                if step.reconnect || (paused && !stay) {
                    self.close_link(l);
                } else {
                    self.links[l].up.extend(step.send);
                }
                if paused && (!stay || !self.nodes[node].outdated) {
                    self.note("outdated schema stop", format!("node {node}"));
                    self.nodes[node].outdated = true;
                }
                self.check_atomic(node);
            }
            Err(e) if is_crash(&e) => self.crash_node(node, "apply"),
            Err(e) => {
                assert!(
                    is_error,
                    "seed {}: node {node} failed: {e}\n{}",
                    self.seed, self.trace
                );
                let msg = e.to_string();
                assert!(
                    msg.contains("Unauthorized") || msg.contains("ShuttingDown"),
                    "seed {}: node {node} was refused: {msg}\n{}",
                    self.seed,
                    self.trace
                );
                self.close_link(l);
            }
        }
    }

    /// The relay sends what each live connection has not been told yet.
    pub(crate) fn fan_out(&mut self) {
        if self.shared.is_none() {
            return;
        }
        for l in 0..self.links.len() {
            if !self.links[l].live || self.links[l].relay_closed {
                continue;
            }
            // Catch-up only while half of the link is free (the relay's bounded outbox).
            if self.links[l].down.len() > self.cap / 2 {
                continue;
            }
            let Some(ep) = self.links[l].ep.as_mut() else {
                continue;
            };
            let mut out = Vec::new();
            let r = self.rt.block_on(ep.changes(true, 4, &mut out));
            match r {
                Ok(_) => self.links[l].down.extend(out),
                Err(c) => panic!("seed {}: fan-out failed: {c:?}", self.seed),
            }
        }
    }

    pub(crate) fn pump(&mut self, i: usize) {
        let Some(l) = self.nodes[i].link else { return };
        if self.links[l].up.len() >= self.cap {
            return; // the socket is full: the client's writer waits, its reader goes on
        }
        if let Some(Some(push)) = self.with_replica(i, "push", |r, n| n.client.poll_push(r)) {
            self.links[l].up.push_back(push);
        }
    }

    pub(crate) fn random_link(&mut self, up: bool) -> Option<usize> {
        let cands: Vec<usize> = (0..self.links.len())
            .filter(|&l| {
                let k = &self.links[l];
                if up {
                    self.relay_reads(l)
                } else {
                    k.live && !k.down.is_empty()
                }
            })
            .collect();
        if cands.is_empty() {
            None
        } else {
            Some(cands[self.rng.random_range(0..cands.len())])
        }
    }
}
