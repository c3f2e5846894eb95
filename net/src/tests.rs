//! Tests of the accept loop, the limits and the timeouts.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_limit_closes_connections_beyond_it_and_frees_places() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limit = Limit::new("test", 2);
    let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
    let release = CancellationToken::new();
    let r = release.clone();
    tokio::spawn(serve(listener, limit.clone(), cancel.clone(), tracker.clone(), move |mut tcp, _, slot| {
        let r = r.clone();
        async move {
            let _slot = slot;
            let _ = tcp.write_all(b"hi").await;
            r.cancelled().await;
        }
    }));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    assert_eq!(limit.in_use(), 2);
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 2];
    assert_eq!(third.read(&mut b).await.unwrap_or(0), 0, "closed without an answer");
    release.cancel();
    tokio::time::timeout(Duration::from_secs(5), async {
        while limit.in_use() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    cancel.cancel();
}

#[test]
fn one_address_cannot_take_every_place() {
    let limit = Limit::new("test", 10).per_ip(3);
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    let b: IpAddr = "10.0.0.2".parse().unwrap();
    let held: Vec<Slot> = (0..3).map(|_| limit.try_take_for(a).unwrap()).collect();
    assert!(limit.try_take_for(a).is_none());
    let other = limit.try_take_for(b).unwrap();
    assert_eq!(limit.in_use(), 4);
    drop(held);
    assert!(limit.try_take_for(a).is_some());
    drop(other);
}

#[test]
fn the_reserve_is_for_the_local_host_only() {
    let limit = Limit::new("test", 2).per_ip(1).reserve_loopback(1);
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let other_loopback: IpAddr = "127.0.0.2".parse().unwrap();
    let far: IpAddr = "10.0.0.1".parse().unwrap();
    let a = limit.take_for(other_loopback).unwrap();
    let b = limit.take_for(far).unwrap();
    assert_eq!(limit.take_for("10.0.0.9".parse().unwrap()).unwrap_err(), Refused::Full);
    assert_eq!(limit.take_for(other_loopback).unwrap_err(), Refused::PerAddress, "127.0.0.2 is not the host");
    let probe = limit.take_for(local).expect("the host takes the reserve");
    assert_eq!(limit.in_use(), 3);
    assert_eq!(limit.take_for(local).unwrap_err(), Refused::Full, "the reserve is bounded too");
    drop(probe);
    assert!(limit.take_for("::1".parse().unwrap()).is_ok(), "::1 is the host as well");
    drop((a, b));
}

#[test]
fn refusals_are_reported_with_their_reason() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let limit = Limit::new("test", 1).per_ip(1).on_refused(move |name, why| s.lock().unwrap().push((name, why)));
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let held = limit.try_take_for(ip).unwrap();
    assert!(limit.try_take_for(ip).is_none());
    assert!(limit.try_take_for("10.0.0.2".parse().unwrap()).is_none());
    assert_eq!(*seen.lock().unwrap(), vec![("test", Refused::PerAddress), ("test", Refused::Full)]);
    drop(held);
}

fn h2_frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn pings_do_not_keep_a_connection_open_requests_do() {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let idle = Duration::from_millis(400);
    let mut io = IdleTimeout::new(a, idle, None).requests_only();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            if let Err(e) = io.read(&mut buf).await {
                return (e.kind(), Instant::now());
            }
        }
    });
    b.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    // Requests every 200 ms for 1 s keep it open.
    for stream in 0..5u32 {
        b.write_all(&h2_frame(1, 2 * stream + 1, &[0x82])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // From here only PINGs, every 50 ms: the idle timer runs from the last request.
    let last_request = Instant::now() - Duration::from_millis(200);
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if reader.is_finished() || b.write_all(&h2_frame(6, 0, &[0; 8])).await.is_err() {
            break;
        }
    }
    let (kind, at) = reader.await.unwrap();
    assert_eq!(kind, io::ErrorKind::TimedOut);
    let after = at - last_request;
    assert!(after >= idle - Duration::from_millis(50) && after <= idle + Duration::from_millis(300), "{after:?}");
}

#[tokio::test]
async fn a_deadline_holds_however_busy_the_peer_and_first_bytes_are_awaited_briefly() {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let start = Instant::now();
    let mut io = IdleTimeout::new(a, Duration::from_secs(60), None).deadline(start + Duration::from_millis(600));
    let mut buf = [0u8; 1];
    let e = loop {
        if b.write_all(b"x").await.is_err() {
            panic!("the reader went away");
        }
        match io.read_exact(&mut buf).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(600) && took < Duration::from_millis(900), "{took:?}");

    let (a, _b) = tokio::io::duplex(64);
    let start = Instant::now();
    let mut io = IdleTimeout::new(a, Duration::from_secs(60), None).first_byte_within(Duration::from_millis(300));
    assert_eq!(io.read_exact(&mut buf).await.unwrap_err().kind(), io::ErrorKind::TimedOut);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(600), "{took:?}");
}

#[tokio::test]
async fn a_second_request_on_a_one_request_connection_fails_it() {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let mut io = IdleTimeout::new(a, Duration::from_secs(10), None).max_requests(1);
    b.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    b.write_all(&h2_frame(1, 1, &[0x82])).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(io.read(&mut buf).await.unwrap() > 0);
    b.write_all(&h2_frame(1, 3, &[0x82])).await.unwrap();
    let mut e = None;
    for _ in 0..4 {
        if let Err(err) = io.read(&mut buf).await {
            e = Some(err.kind());
            break;
        }
    }
    assert_eq!(e, Some(io::ErrorKind::PermissionDenied));
}

#[tokio::test]
async fn a_silent_peer_times_out_a_talking_one_does_not() {
    let (a, mut b) = tokio::io::duplex(64);
    let idle = Duration::from_millis(300);
    let mut io = IdleTimeout::new(a, idle, None);
    let mut buf = [0u8; 1];
    let start = Instant::now();
    // Talking every 100 ms for 1 s keeps it open.
    for _ in 0..10 {
        b.write_all(b"x").await.unwrap();
        io.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = io.read_exact(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(start.elapsed() >= Duration::from_secs(1) + idle - Duration::from_millis(100));
}

#[tokio::test]
async fn a_full_evicting_limit_takes_the_oldest_place_back() {
    let limit = Limit::new("test", 2).per_ip(2).evict_oldest();
    let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    // Holders that let their place go when told, as listeners do.
    let hold = |slot: Slot| {
        tokio::spawn(async move {
            slot.evicted().await;
        })
    };
    let oldest = hold(limit.admit(a).await.unwrap());
    let second = hold(limit.admit(a).await.unwrap());
    assert!(limit.admit(a).await.is_none(), "the address's share still holds");
    let newest = limit.admit(b).await.expect("the oldest place is taken back for a newcomer");
    assert!(oldest.await.is_ok());
    assert!(!second.is_finished(), "only the oldest is let go");
    assert_eq!(limit.in_use(), 2);
    drop(newest);
    let plain = Limit::new("test", 1);
    let _held = plain.admit(a).await.unwrap();
    assert!(plain.admit(b).await.is_none(), "a limit that does not evict refuses");
}
