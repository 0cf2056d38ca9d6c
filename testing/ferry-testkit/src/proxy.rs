//! A TCP fault proxy for tests: forwards connections to an upstream address and, on command,
//! delays them, stalls them (half-open: both ends stay connected, nothing gets through) or
//! resets them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Forward each chunk after a delay.
    Delay(Duration),
    /// Hold everything (connections stay open; nothing flows until the mode changes).
    Stall,
}

struct State {
    mode: Mode,
    upstream: SocketAddr,
    conns: Vec<TcpStream>,
}

/// A running proxy.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FaultProxy {
    /// Starts forwarding to `upstream`, in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        Self::start_with(upstream, None)
    }

    /// Like [`FaultProxy::start`], with the TCP send and receive buffers of both of its sockets
    /// of every connection set to `buffer` bytes (a small link: little in flight).
    pub fn start_with(upstream: SocketAddr, buffer: Option<usize>) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Pass,
            upstream,
            conns: Vec::new(),
        }));
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for inbound in l.incoming() {
                let Ok(client) = inbound else { return };
                let up = st.lock().unwrap().upstream;
                let Ok(server) = TcpStream::connect(up) else {
                    drop(client);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let Some(n) = buffer {
                    for s in [&client, &server] {
                        let s = socket2::SockRef::from(s);
                        let _ = s.set_send_buffer_size(n);
                        let _ = s.set_recv_buffer_size(n);
                    }
                }
                {
                    let mut s = st.lock().unwrap();
                    s.conns.retain(|c| c.peer_addr().is_ok());
                    s.conns.push(client.try_clone().unwrap());
                    s.conns.push(server.try_clone().unwrap());
                }
                pipe(
                    Arc::clone(&st),
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                );
                pipe(Arc::clone(&st), server, client);
            }
        });
        FaultProxy { addr, state }
    }

    /// The relay URL through the proxy.
    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    /// Changes what happens to the bytes from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Resets every open connection (RST: linger 0, then shut down).
    pub fn reset_all(&self) -> usize {
        let conns = std::mem::take(&mut self.state.lock().unwrap().conns);
        for c in &conns {
            let _ = socket2::SockRef::from(c).set_linger(Some(Duration::ZERO));
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        conns.len() / 2
    }
}

fn pipe(st: Arc<Mutex<State>>, mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            loop {
                let mode = st.lock().unwrap().mode;
                match mode {
                    Mode::Pass => break,
                    Mode::Delay(d) => {
                        std::thread::sleep(d);
                        break;
                    }
                    Mode::Stall => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
