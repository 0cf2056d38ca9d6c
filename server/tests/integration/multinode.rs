//! Several relay processes over one PostgreSQL database, as deployed behind a load balancer.
//!
//! Three `ferry-relay` processes share a fresh database. Twelve replicas push through a small
//! TCP load balancer (round robin over the nodes that accept a connection, like any L4
//! balancer with health checks); one follower per node reads the log straight from its node.
//! Midway one node is killed with SIGKILL: its clients reconnect through the balancer to the
//! others, its follower moves to another node. At the end every follower has seen every
//! change set exactly once, in the same order, with no gaps, and every change set the
//! replicas committed is in the log exactly once (a pusher's work is acknowledged only when
//! its queue is empty, so "all present" covers every acknowledgement).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use ferry_core::protocol::ServerMsg;
use ferry_core::{ReplicaId, Value};
use ferry_testkit::relay::{RelayProc, admin_token, raw};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Round-robin TCP balancer: each accepted connection goes to the next node that accepts.
async fn balancer(nodes: Vec<SocketAddr>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let nodes = nodes.clone();
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                for _ in 0..nodes.len() {
                    let i = next.fetch_add(1, Ordering::Relaxed) % nodes.len();
                    if let Ok(mut out) = tokio::net::TcpStream::connect(nodes[i]).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// What a follower saw: positions covered, in order, and the change sets in them.
#[derive(Default)]
struct Seen {
    /// `(after, up_to)` of every `Changes` frame.
    ranges: Vec<(u64, u64)>,
    /// `(server_seq, origin, origin_seq, id)` in arrival order.
    sets: Vec<(u64, ReplicaId, u64, [u8; 16])>,
    /// Nodes it was connected to, in order.
    nodes: Vec<usize>,
}

/// Follows the log from node `home`, moving to the next live node when its node dies.
async fn follow(
    nodes: Vec<SocketAddr>,
    home: usize,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let me = ReplicaId(*ulid::Ulid::generate().to_bytes().first_chunk().unwrap());
    let token = admin_token("follower");
    let mut node = home;
    while !stop.load(Ordering::SeqCst) {
        let cursor = seen.lock().ranges.last().map_or(0, |r| r.1);
        let url = format!("ws://{}/sync", nodes[node]);
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            node = (node + 1) % nodes.len();
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        seen.lock().nodes.push(node);
        raw::send(&mut ws, &raw::hello(me, &token, cursor)).await;
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let m = tokio::time::timeout(Duration::from_millis(500), raw::recv(&mut ws)).await;
            match m {
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(ServerMsg::Changes {
                    after,
                    up_to,
                    change_sets,
                    ..
                })) => {
                    let mut s = seen.lock();
                    s.ranges.push((after, up_to));
                    for c in change_sets {
                        s.sets.push((
                            c.server_seq,
                            c.change_set.origin,
                            c.change_set.origin_seq,
                            c.change_set.id,
                        ));
                    }
                }
                Ok(Some(ServerMsg::Error { .. })) => break,
                Ok(Some(_)) => {}
            }
        }
        // The node went away: try the next one.
        node = (node + 1) % nodes.len();
    }
}

#[test]
fn three_nodes_twelve_pushers_a_follower_per_node_and_a_node_killed() {
    let url = ferry_testkit::pg::fresh_pg_db();
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes: Vec<RelayProc> = (0..3)
        .map(|i| RelayProc::start_on(&tmp.path().join(format!("node{i}")), &url, ""))
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lb = rt.block_on(balancer(addrs.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..3).map(|_| Arc::default()).collect();
    let followers: Vec<_> = (0..3)
        .map(|i| {
            rt.spawn(follow(
                addrs.clone(),
                i,
                Arc::clone(&seen[i]),
                Arc::clone(&stop),
            ))
        })
        .collect();

    const PUSHERS: usize = 12;
    const WRITES: usize = 40;
    let replicas: Vec<_> = (0..PUSHERS)
        .map(|i| ferry_testkit::relay::open(tmp.path(), &format!("pusher{i}")))
        .collect();
    let handles: Vec<_> = replicas
        .iter()
        .map(|r| {
            ferry_testkit::relay::connect(r, &format!("ws://{lb}/sync"), admin_token("pusher"))
        })
        .collect();
    let written = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let r = Arc::clone(r);
            let written = Arc::clone(&written);
            std::thread::spawn(move || {
                for k in 0..WRITES {
                    r.execute(
                        "INSERT INTO tag(id, name) VALUES (?1, ?2)",
                        &[
                            Value::Text(format!("p{i}-{k}")),
                            Value::Text(format!("{k}")),
                        ],
                    )
                    .unwrap();
                    written.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(15));
                }
            })
        })
        .collect();
    // Kill node 1 once about a third of the writes are committed locally.
    let deadline = Instant::now() + Duration::from_secs(60);
    while written.load(Ordering::SeqCst) < PUSHERS * WRITES / 3 {
        assert!(Instant::now() < deadline, "pushers stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
    nodes[1].kill();
    for t in threads {
        t.join().unwrap();
    }
    for h in &handles {
        ferry_testkit::relay::wait_synced(h);
    }
    // Every change set is in the log; the surviving nodes' followers reach its head.
    let ids: HashMap<ReplicaId, usize> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| (r.replica_id().unwrap(), i))
        .collect();
    let total = (PUSHERS * WRITES) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = seen
            .iter()
            .all(|s| s.lock().ranges.last().is_some_and(|r| r.1 >= total));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "followers did not reach {total}: {:?}",
            seen.iter()
                .map(|s| s.lock().ranges.last().copied())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    for f in followers {
        rt.block_on(f).unwrap();
    }
    let reference: Vec<_> = seen[0].lock().sets.clone();
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock();
        // Ranges chain from 0 without gaps or overlaps.
        let mut at = 0;
        for (after, up_to) in &s.ranges {
            assert_eq!(
                *after, at,
                "follower {i}: range starts at {after}, expected {at}"
            );
            assert!(*up_to >= *after);
            at = *up_to;
        }
        assert_eq!(at, total, "follower {i} ends at the head");
        // Each position exactly once, in order, 1..=total (every set here is visible).
        let seqs: Vec<u64> = s.sets.iter().map(|x| x.0).collect();
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "follower {i}: positions"
        );
        assert_eq!(
            s.sets, reference,
            "follower {i} saw the same log as follower 0"
        );
    }
    // Each replica's change sets are all there, once each, in its own order.
    let mut per: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut uniq = HashSet::new();
    for (_, origin, oseq, id) in &reference {
        assert!(uniq.insert(*id), "a change set appears twice");
        per.entry(ids[origin]).or_default().push(*oseq);
    }
    for i in 0..PUSHERS {
        assert_eq!(
            per.get(&i).cloned().unwrap_or_default(),
            (1..=WRITES as u64).collect::<Vec<_>>(),
            "pusher {i}: every write acknowledged once, in order"
        );
    }
    // The killed node's follower moved on; someone was on every node.
    let f1 = seen[1].lock();
    assert!(
        f1.nodes.len() >= 2 && f1.nodes[0] == 1 && f1.nodes[1..].iter().all(|n| *n != 1),
        "follower of node 1 reconnected elsewhere: {:?}",
        f1.nodes
    );
    drop(f1);
    // Survivors serve everything; a replica catching up from zero through the balancer converges.
    let late = ferry_testkit::relay::open(tmp.path(), "late");
    let h = ferry_testkit::relay::connect(&late, &format!("ws://{lb}/sync"), admin_token("late"));
    ferry_testkit::relay::wait_synced(&h);
    let n = late.query("SELECT count(*) FROM tag", &[]).unwrap();
    assert_eq!(n.rows[0][0], Value::Integer(total as i64));
    drop(nodes);
}
