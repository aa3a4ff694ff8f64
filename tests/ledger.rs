//! The token budget store against a real `redis-server`: two replicas share one total, charges
//! from both add up exactly, totals expire with their key, and a Redis that dies, hangs or comes
//! back is answered within the timeout and recovered from.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use sidekey::ledger::{admits, errors_counter, Ledger, LedgerError, LedgerSettings, Unavailable};
use support::redis::{free_port, RedisServer};
use support::WAIT;
use tokio::time::{timeout, Instant};

const TIMEOUT: Duration = Duration::from_millis(300);
/// A bounded call may take its timeout plus this much scheduling slack on a busy machine.
const SLACK: Duration = Duration::from_millis(700);

fn settings(errors: Option<IntCounter>) -> LedgerSettings {
    LedgerSettings { timeout: TIMEOUT, errors, ..LedgerSettings::default() }
}

fn ledger(url: &str) -> Ledger {
    Ledger::from_url(url, settings(None)).expect("valid url")
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An hour from now: longer than any test.
fn exp() -> u64 {
    now_unix() + 3600
}

fn jti() -> String {
    format!("jti-{:016x}", fastrand::u64(..))
}

/// A plain connection for looking at what the ledger wrote.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(server.url()).unwrap();
    timeout(WAIT, client.get_multiplexed_async_connection()).await.unwrap().unwrap()
}

/// Runs `call`, asserting it answers within the timeout (plus slack) with `Unavailable`.
async fn assert_unavailable_in_time<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, LedgerError>>,
) {
    let started = Instant::now();
    let result = timeout(WAIT, call).await.unwrap_or_else(|_| panic!("{what}: hung"));
    let took = started.elapsed();
    assert!(matches!(result, Err(LedgerError::Unavailable(_))), "{what}: {result:?}");
    assert!(took <= TIMEOUT + SLACK, "{what}: took {took:?}");
}

/// Polls until `ledger` answers `used` again, bounded.
async fn until_available(ledger: &Ledger, jti: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        match ledger.used(jti).await {
            Ok(n) => return n,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_replicas_see_one_total() {
    let server = RedisServer::start().await;
    let (a, b) = (ledger(&server.url()), ledger(&server.url()));
    let (key, budget) = (jti(), 100);

    assert_eq!(b.used(&key).await.unwrap(), 0, "never charged: 0");
    assert_eq!(a.charge(&key, 60, exp()).await.unwrap(), 60);
    let seen = b.used(&key).await.unwrap();
    assert_eq!(seen, 60);
    assert!(admits(seen, budget), "replica b admits at 60 of 100");
    // The request b admitted uses 70: it completes, crossing the budget, and is charged in full.
    assert_eq!(b.charge(&key, 70, exp()).await.unwrap(), 130);
    let seen = a.used(&key).await.unwrap();
    assert_eq!(seen, 130);
    assert!(!admits(seen, budget), "replica a now refuses");

    let stored: u64 = redis::cmd("GET")
        .arg(format!("sidekey:budget:{key}"))
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert_eq!(stored, 130, "the documented key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_charges_from_two_replicas_sum_exactly() {
    let server = RedisServer::start().await;
    let replicas = [ledger(&server.url()), ledger(&server.url())];
    let key = jti();
    let (tasks_per_replica, charges, tokens) = (8u64, 50u64, 7u64);
    let mut tasks = Vec::new();
    for replica in &replicas {
        for _ in 0..tasks_per_replica {
            let (l, key) = (replica.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..charges {
                    l.charge(&key, tokens, exp()).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        timeout(WAIT, t).await.unwrap().unwrap();
    }
    let want = 2 * tasks_per_replica * charges * tokens;
    assert_eq!(replicas[0].used(&key).await.unwrap(), want);
    assert_eq!(replicas[1].used(&key).await.unwrap(), want);
}

#[tokio::test]
async fn the_total_expires_at_the_keys_exp() {
    let server = RedisServer::start().await;
    let l = ledger(&server.url());
    let mut conn = raw(&server).await;

    // The expiry is set with the charge, at the given second: check it rather than wait for it.
    let key = jti();
    let at = now_unix() + 3;
    l.charge(&key, 5, at).await.unwrap();
    let expire_time: u64 =
        redis::cmd("EXPIRETIME").arg(format!("sidekey:budget:{key}")).query_async(&mut conn).await.unwrap();
    assert_eq!(expire_time, at);
    let pttl: i64 =
        redis::cmd("PTTL").arg(format!("sidekey:budget:{key}")).query_async(&mut conn).await.unwrap();
    assert!(pttl > 0 && pttl <= 3000, "pttl {pttl}");
    // Each charge sets it again (a key's exp does not change; this just shows the last one wins).
    l.charge(&key, 5, at + 10).await.unwrap();
    let expire_time: u64 =
        redis::cmd("EXPIRETIME").arg(format!("sidekey:budget:{key}")).query_async(&mut conn).await.unwrap();
    assert_eq!(expire_time, at + 10);
    assert_eq!(l.used(&key).await.unwrap(), 10);

    // An expiry already past deletes the total at once.
    let gone = jti();
    assert_eq!(l.charge(&gone, 5, now_unix() - 1).await.unwrap(), 5);
    assert_eq!(l.used(&gone).await.unwrap(), 0);

    // And one a second ahead is gone within a couple of seconds.
    let soon = jti();
    l.charge(&soon, 5, now_unix() + 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while l.used(&soon).await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_key_that_is_not_a_counter_is_an_error_not_zero() {
    let server = RedisServer::start().await;
    let errors = errors_counter();
    let l = Ledger::from_url(&server.url(), settings(Some(errors.clone()))).unwrap();
    let key = jti();
    let _: () = redis::cmd("SET")
        .arg(format!("sidekey:budget:{key}"))
        .arg("not a number")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    let used = l.used(&key).await;
    assert!(matches!(used, Err(LedgerError::Unavailable(Unavailable::Redis(_)))), "{used:?}");
    let charged = l.charge(&key, 1, exp()).await;
    assert!(matches!(charged, Err(LedgerError::Unavailable(Unavailable::Redis(_)))), "{charged:?}");
    assert_eq!(errors.get(), 2, "both counted");
    // The connection is still good for other keys.
    assert_eq!(l.charge(&jti(), 1, exp()).await.unwrap(), 1);
}

#[tokio::test]
async fn redis_killed_is_unavailable_within_the_timeout_and_restarted_is_used_again() {
    let server = RedisServer::start().await;
    let errors = errors_counter();
    let l = Ledger::from_url(&server.url(), settings(Some(errors.clone()))).unwrap();
    let key = jti();
    assert_eq!(l.charge(&key, 10, exp()).await.unwrap(), 10);

    let mut server = server;
    server.kill();
    for i in 0..5 {
        assert_unavailable_in_time(&format!("used #{i}"), l.used(&key)).await;
        assert_unavailable_in_time(&format!("charge #{i}"), l.charge(&key, 1, exp())).await;
    }
    assert_eq!(errors.get(), 10, "every failure counted");

    let _server = RedisServer::start_on(server.port(), &[]).await;
    // Without persistence the restarted Redis starts empty; what matters is that the same
    // handle reconnects by itself.
    assert_eq!(until_available(&l, &key).await, 0);
    assert_eq!(l.charge(&key, 3, exp()).await.unwrap(), 3);
}

#[tokio::test]
async fn a_store_built_before_redis_is_up_connects_when_it_is() {
    let port = free_port();
    let l = ledger(&format!("redis://127.0.0.1:{port}/0"));
    let key = jti();
    assert_unavailable_in_time("used before redis", l.used(&key)).await;
    assert_unavailable_in_time("charge before redis", l.charge(&key, 1, exp())).await;
    let _server = RedisServer::start_on(port, &[]).await;
    assert_eq!(until_available(&l, &key).await, 0);
    assert_eq!(l.charge(&key, 4, exp()).await.unwrap(), 4);
}

#[tokio::test]
async fn a_redis_that_accepts_but_never_answers_is_bounded_by_the_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket); // read nothing, answer nothing
        }
    });
    let l = ledger(&format!("redis://{addr}/0"));
    for _ in 0..3 {
        let started = Instant::now();
        let result = timeout(WAIT, l.used(&jti())).await.expect("bounded");
        assert!(
            matches!(result, Err(LedgerError::Unavailable(Unavailable::Timeout(t))) if t == TIMEOUT),
            "{result:?}"
        );
        assert!(started.elapsed() <= TIMEOUT + SLACK, "took {:?}", started.elapsed());
    }
    held.abort();
}

#[tokio::test]
async fn a_password_works_and_never_shows_in_errors() {
    let server = RedisServer::start_with(&["--requirepass", "hunter2-secret"]).await;
    let port = server.port();
    let good = ledger(&format!("redis://:hunter2-secret@127.0.0.1:{port}/0"));
    assert_eq!(good.charge(&jti(), 2, exp()).await.unwrap(), 2);
    assert!(!format!("{good:?}").contains("hunter2"));

    let bad = ledger(&format!("redis://:wrong-password-42@127.0.0.1:{port}/0"));
    let err = bad.used(&jti()).await.expect_err("wrong password");
    assert!(matches!(err, LedgerError::Unavailable(_)), "{err:?}");
    for shown in [format!("{err:?}"), chain(&err)] {
        assert!(!shown.contains("wrong-password-42"), "{shown}");
    }

    drop(server);
    let err = good.used(&jti()).await.expect_err("redis gone");
    for shown in [format!("{err:?}"), chain(&err)] {
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

#[tokio::test]
async fn a_refused_connection_is_tried_again_once_redis_would_accept_it() {
    // A wrong password fails the connection attempt without an I/O error, which the redis
    // client's manager never retries by itself; the ledger replaces it after a while.
    let server = RedisServer::start_with(&["--requirepass", "old-password"]).await;
    let l = ledger(&format!("redis://:new-password@127.0.0.1:{}/0", server.port()));
    let key = jti();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_unavailable_in_time("wrong password", l.used(&key)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut admin = timeout(
        WAIT,
        redis::Client::open(format!("redis://:old-password@127.0.0.1:{}/0", server.port()))
            .unwrap()
            .get_multiplexed_async_connection(),
    )
    .await
    .unwrap()
    .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("new-password")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(until_available(&l, &key).await, 0);
    assert_eq!(l.charge(&key, 1, exp()).await.unwrap(), 1);
}

/// The error and its sources, as a log line would show them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
