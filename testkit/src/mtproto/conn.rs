//! Connections: accepting them per data centre, reading and writing frames through the
//! emulated network (see `net`), and closing them when told to.
//!
//! Each connection runs three tasks: the reader (frames in, stamped with when they would
//! reach the server over the emulated link), the inbound task (hands each packet to the
//! session layer at that time) and the writer (each answer leaves when the link would deliver
//! it). A fourth loop supervises them: a dropped-connection fault, `drop_connections`, a
//! missed `ping_delay_disconnect` deadline or the client hanging up ends all of them.

use std::sync::{Arc, Mutex};

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::mtp::{self, Ctx, Out};
use super::net::{Lane, SOCKET_BUFFER_BYTES};
use super::server::Server;
use super::wire;

pub(crate) async fn accept_loop(
    listener: TcpListener,
    server: Arc<Server>,
    dc: i32,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                server.counters.bump("connections");
                server.counters.bump(&format!("dc{dc}:connections"));
                tokio::spawn(connection(stream, server.clone(), dc));
            }
        }
    }
}

/// The two lanes of a connection and the jitter source.
#[derive(Default)]
struct Link {
    up: Lane,
    down: Lane,
    rng: u64,
}

async fn connection(stream: TcpStream, server: Arc<Server>, dc: i32) {
    let (rd, wr) = stream.into_split();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Out>();
    let (in_tx, in_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let (kill_tx, mut kill_rx) = watch::channel(false);
    let (deadline_tx, mut deadline_rx) = watch::channel::<Option<Instant>>(None);
    let mut drop_all = server.drop_all.subscribe();
    let profile = *server.net.lock().unwrap();
    let link = Arc::new(Mutex::new(Link {
        up: Lane::after_handshake(Instant::now(), &profile),
        rng: super::server::rnd_i64() as u64 | 1,
        ..Link::default()
    }));
    let ctx = Arc::new(Ctx {
        server: server.clone(),
        dc,
        out: out_tx,
        kill: kill_tx,
        deadline: deadline_tx,
    });

    let mut reader = tokio::spawn(read_loop(rd, server.clone(), dc, link.clone(), in_tx));
    let inbound = tokio::spawn(inbound_loop(in_rx, ctx.clone()));
    let writer = tokio::spawn(write_loop(
        wr,
        server.clone(),
        dc,
        link,
        out_rx,
        ctx.kill.clone(),
    ));
    drop(ctx);

    loop {
        // The deadline in force (a later ping moves it).
        let deadline = *deadline_rx.borrow_and_update();
        tokio::select! {
            _ = &mut reader => break,
            _ = kill_rx.changed() => break,
            _ = drop_all.changed() => break,
            changed = deadline_rx.changed() => if changed.is_err() { break },
            _ = sleep_until_opt(deadline) => break,
        }
    }
    reader.abort();
    inbound.abort();
    writer.abort();
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads frames; each is stamped with its arrival time over the emulated link. With a
/// bandwidth cap, reading stops while more than a socket buffer's worth is still "on the
/// wire", so a fast client is held back as TCP would hold it.
async fn read_loop(
    mut rd: OwnedReadHalf,
    server: Arc<Server>,
    dc: i32,
    link: Arc<Mutex<Link>>,
    inbound: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
) {
    let key_id = match server.dc(dc) {
        Some(d) => d.key.key_id,
        None => return,
    };
    let mut seq_in = 0i32;
    loop {
        let Ok(frame) = wire::read_frame(&mut rd, &mut seq_in).await else {
            return;
        };
        if frame.len() < 8 || frame[..8] != key_id {
            // Telegram's answer to a key it does not know: transport error -404.
            // The writer sends it and ends the connection.
            server.counters.bump("unknown_auth_key");
            let _ = inbound.send((Instant::now(), Vec::new()));
            std::future::pending::<()>().await;
        }
        let now = Instant::now();
        let profile = *server.net.lock().unwrap();
        let (arrival, hold) = {
            let mut l = link.lock().unwrap();
            let Link { up, rng, .. } = &mut *l;
            let arrival = up.schedule(&profile, now, frame.len(), rng);
            let hold = profile.conn_bytes_per_sec.map(|rate| {
                let buffer = std::time::Duration::from_secs_f64(
                    SOCKET_BUFFER_BYTES as f64 / rate.max(1) as f64,
                );
                up.backlog(now).saturating_sub(buffer)
            });
            (arrival, hold)
        };
        if inbound.send((arrival, frame)).is_err() {
            return;
        }
        if let Some(hold) = hold
            && !hold.is_zero()
        {
            tokio::time::sleep(hold).await;
        }
    }
}

/// Hands packets to the session layer when they arrive over the emulated link.
async fn inbound_loop(mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>, ctx: Arc<Ctx>) {
    let key = match ctx.server.dc(ctx.dc) {
        Some(d) => d.key.clone(),
        None => return,
    };
    while let Some((at, mut frame)) = rx.recv().await {
        if frame.is_empty() {
            let _ = ctx.out.send(Out {
                body: Vec::new(),
                content_related: false,
                server_initiated: false,
                session: 0,
                queued: Instant::now(),
            });
            return;
        }
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        let Ok(plain) = wire::decrypt_from_client(&key, &mut frame) else {
            let _ = ctx.kill.send(true);
            return;
        };
        let Ok((salt, session, top)) = wire::parse_plaintext(plain) else {
            let _ = ctx.kill.send(true);
            return;
        };
        mtp::on_packet(&ctx, salt, session, top);
    }
}

/// Writes each message when the emulated link delivers it. Sequence numbers count per
/// session: content-related messages take the next odd number, the others the even one.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    server: Arc<Server>,
    dc: i32,
    link: Arc<Mutex<Link>>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    kill: watch::Sender<bool>,
) {
    let Some(key) = server.dc(dc).map(|d| d.key.clone()) else {
        return;
    };
    let mut seq_out = 0i32;
    let mut content: std::collections::HashMap<i64, i32> = Default::default();
    while let Some(m) = rx.recv().await {
        if m.body.is_empty() {
            // An empty message asks for the -404 transport error, then the end.
            use tokio::io::AsyncWriteExt;
            let _ = wr.write_all(&(-404i32).to_le_bytes()).await;
            let _ = wr.shutdown().await;
            let _ = kill.send(true);
            return;
        }
        let profile = *server.net.lock().unwrap();
        if !profile.is_ideal() {
            let at = {
                let mut l = link.lock().unwrap();
                let Link { down, rng, .. } = &mut *l;
                down.schedule(&profile, m.queued, m.body.len() + 64, rng)
            };
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
        }
        let n = content.entry(m.session).or_insert(0);
        let seq_no = if m.content_related {
            *n += 1;
            *n * 2 - 1
        } else {
            *n * 2
        };
        let mut plain = Vec::with_capacity(m.body.len() + 32);
        plain.extend_from_slice(&mtp::current_salt(&server, dc).to_le_bytes());
        plain.extend_from_slice(&m.session.to_le_bytes());
        plain.extend_from_slice(&server.next_msg_id(m.server_initiated).to_le_bytes());
        plain.extend_from_slice(&seq_no.to_le_bytes());
        plain.extend_from_slice(&(m.body.len() as i32).to_le_bytes());
        plain.extend_from_slice(&m.body);
        let packet = wire::encrypt_for_client(&key, plain);
        if wire::write_frame(&mut wr, &mut seq_out, &packet)
            .await
            .is_err()
        {
            return;
        }
    }
}
