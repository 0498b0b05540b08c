//! Every refusal of the security model, each asserting the client's error text and the
//! policy-decision record; token renewal across expiry; revocation ending a live tunnel.

mod common;

use std::time::Duration;

use cloudtap_edge::client::{ClientError, Tunnel};
use cloudtap_edge::token::{Claims, SigningKey, TokenKind, now_unix};
use cloudtap_proto::tunnel::v1 as pb;
use cloudtap_schemas::{Body, verify_chain};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn edge() -> TestEdge {
    let up = echo_upstream().await;
    TestEdge::start(config(&[("echo", up.clone()), ("forbidden", up)])).await
}

fn claims(sub: &str, targets: &[&str], exp: i64, cnf: Option<String>) -> Claims {
    Claims {
        jti: uuid::Uuid::now_v7().to_string(),
        kind: TokenKind::User,
        sub: sub.into(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        roles: vec![],
        cnf,
        sid: None,
        parent: None,
        iat: now_unix() - 10,
        exp,
    }
}

async fn echo_once(t: &Tunnel) {
    let mut s = t.open_stream("test").await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_forged_and_wrong_target_tokens_are_refused_and_recorded() {
    let edge = edge().await;
    let key = edge.signing_key();

    let expired = key.sign(&claims("alice", &["*"], now_unix() - 120, None));
    let e = edge.open(&expired, "echo").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("expired") && e.message().contains("cloudtapctl login"),
        "{}",
        e.message()
    );
    let d = edge.wait_refusal("token_expired").await;
    assert_eq!(d.action, "open_tunnel");

    let forged = SigningKey::generate().sign(&claims("alice", &["*"], now_unix() + 600, None));
    let e = edge.open(&forged, "echo").await.unwrap_err();
    assert!(
        e.message().contains("signature is invalid"),
        "{}",
        e.message()
    );
    edge.wait_refusal("token_forged").await;

    let scoped = key.sign(&claims("alice", &["other"], now_unix() + 600, None));
    let e = edge.open(&scoped, "echo").await.unwrap_err();
    assert!(
        e.message().contains("not valid for target \"echo\""),
        "{}",
        e.message()
    );
    let d = edge.wait_refusal("token_wrong_target").await;
    assert_eq!((d.identity.as_str(), d.target.as_str()), ("alice", "echo"));

    let e = edge.open("not-a-token", "echo").await.unwrap_err();
    assert!(e.message().contains("malformed"), "{}", e.message());
    edge.wait_refusal("token_malformed").await;

    // Valid token, but policy denies the target.
    let alice = edge.tls_for("alice");
    let user = edge.login(&alice).await;
    let e = edge.open(&user.token, "forbidden").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("ask an admin"), "{}", e.message());
    edge.wait_refusal("forbidden").await;
    // And no token at all.
    let e = edge
        .grpc()
        .await
        .open_tunnel(pb::OpenTunnelRequest {
            target: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("cloudtapctl login"), "{}", e.message());
    edge.wait_refusal("unauthenticated").await;
    // None of the records or messages carries a token.
    for r in all_records(edge.log.as_ref()).await {
        if let Body::PolicyDecision(p) = &r.body {
            for t in [&expired, &forged, &scoped, &user.token] {
                assert!(!p.reason.contains(t.as_str()));
            }
        }
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_is_refused_with_another_certificate() {
    let edge = edge().await;
    let admin = edge.admin_tls();
    let user = edge.login(&admin).await;
    let open = edge.open(&user.token, "echo").await.unwrap();
    // Same CA, same identity even: but not the certificate the token is bound to.
    let other_cert = edge.tls_for("dev-admin");
    let e = Tunnel::attach(&other_cert, &open.tunnel_addr, &open.session_token, "echo")
        .await
        .unwrap_err();
    let (code, msg) = refused(&e);
    assert_eq!(code, "token_wrong_certificate");
    assert!(msg.contains("bound to another client certificate"), "{msg}");
    let d = edge.wait_refusal("token_wrong_certificate").await;
    assert_eq!(d.action, "attach");
    // The right certificate still attaches.
    let t = Tunnel::attach(&admin, &open.tunnel_addr, &open.session_token, "echo")
        .await
        .unwrap();
    echo_once(&t).await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let edge = edge().await;
    let rogue_ca = cloudtap_edge::pki::generate_ca("rogue").unwrap();
    let ca_file = edge.dir.path().join("rogue-ca.pem");
    std::fs::write(&ca_file, &rogue_ca.cert_pem).unwrap();
    // The rogue client trusts the real server CA, but presents a rogue certificate.
    let rogue = tls_from(&rogue_ca, "mallory", &edge.pki.ca_cert(), edge.dir.path());
    let e = cloudtap_edge::client::login(&rogue, &edge.tunnel, vec![], 0)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("client certificate"), "{e}");
    let d = edge.wait_refusal("tls_handshake").await;
    assert_eq!(d.action, "tunnel_handshake");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_and_revocation_ends_live_tunnels() {
    let edge = edge().await;
    let admin = edge.admin_tls();
    let admin_token = edge.login(&admin).await.token;
    let alice = edge.tls_for("alice");
    let (mut tunnel, open, _) = edge.tunnel(&alice, "echo").await;
    echo_once(&tunnel).await;
    let alice_token_id = {
        let r = edge
            .wait_record("alice's attach", |r| matches!(&r.body, Body::PolicyDecision(p) if p.action == "open_tunnel" && p.identity == "alice"))
            .await;
        match r.body {
            Body::PolicyDecision(p) => p.token_id,
            _ => unreachable!(),
        }
    };
    // Non-admins may not revoke.
    let alice_login = edge.login(&alice).await;
    let e = edge
        .grpc()
        .await
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: alice_token_id.clone(),
                reason: String::new(),
            },
            &alice_login.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    let started = std::time::Instant::now();
    let r = edge
        .grpc()
        .await
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: alice_token_id.clone(),
                reason: "test".into(),
            },
            &admin_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.session_ids, vec![open.session_id.clone()]);
    tokio::time::timeout(Duration::from_secs(60), tunnel.closed())
        .await
        .expect("revocation ends the tunnel within 60 s");
    eprintln!("revocation ended the tunnel after {:?}", started.elapsed());
    assert_eq!(
        tunnel.notice().map(|n| n.reason).as_deref(),
        Some("revoked")
    );
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    edge.wait_record("session_closed revoked", |r| {
        r.chain_id == session
            && matches!(&r.body, Body::SessionClosed(c) if c.reason.as_str() == "revoked")
    })
    .await;

    // The revocation is a control record on the log, which is how every edge learns it.
    let recs = all_records(edge.log.as_ref()).await;
    assert!(
        recs.iter()
            .any(|r| matches!(&r.body, Body::Control(c) if c.subject == alice_token_id))
    );
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_user_token_cannot_open_tunnels() {
    let edge = edge().await;
    let admin_token = edge.login(&edge.admin_tls()).await.token;
    let alice = edge.tls_for("alice");
    let user = edge.login(&alice).await;
    edge.grpc()
        .await
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                // Any spelling of the UUID names the same token.
                token_id: user.token_id.to_uppercase(),
                reason: String::new(),
            },
            &admin_token,
        ))
        .await
        .unwrap();
    // The revocation travels through the log; wait until this edge has applied it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let e = loop {
        match edge.open(&user.token, "echo").await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "revocation not applied within 20 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(
        e.message().contains("revoked") && e.message().contains("ask an admin"),
        "{}",
        e.message()
    );
    edge.wait_refusal("token_revoked").await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_tunnel_alive_across_expiry_and_its_absence_ends_it() {
    let up = echo_upstream().await;
    let mut cfg = config(&[("echo", up)]);
    cfg.tokens.session_ttl_secs = 4;
    let edge = TestEdge::start(cfg).await;
    let (mut tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "echo").await;
    let first_expiry = open.expires_unix;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let renewed = edge
        .grpc()
        .await
        .renew_token(bearer(
            pb::RenewTokenRequest {
                session_id: open.session_id.clone(),
            },
            &open.session_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.expires_unix > first_expiry);
    // Token times are whole seconds and a token is expired once now >= exp: from the
    // second `first_expiry` on, the first token is dead and the renewed one (at least
    // a second younger) carries the tunnel.
    assert!(renewed.expires_unix > first_expiry);
    while now_unix() < first_expiry {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    echo_once(&tunnel).await;
    // An expired session token cannot renew.
    tokio::time::timeout(Duration::from_secs(20), tunnel.closed())
        .await
        .expect("tunnel ends once its token expires");
    assert_eq!(
        tunnel.notice().map(|n| n.reason).as_deref(),
        Some("token_expired")
    );
    let e = edge
        .grpc()
        .await
        .renew_token(bearer(
            pb::RenewTokenRequest {
                session_id: open.session_id.clone(),
            },
            &renewed.session_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    edge.wait_record("session_closed token_expired", |r| {
        r.chain_id == session
            && matches!(&r.body, Body::SessionClosed(c) if c.reason.as_str() == "token_expired")
    })
    .await;
    verify_chain(None, &edge.log.read_chain(session).await.unwrap()).unwrap();
    edge.stop().await;
}

async fn next_event(s: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream is open")
        .expect("a well-formed event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_are_scoped_to_what_the_watcher_may_read() {
    let edge = edge().await;
    let admin = edge.admin_tls();
    let alice = edge.tls_for("alice");
    let admin_token = edge.login(&admin).await.token;
    let alice_token = edge.login(&alice).await.token;
    let watch = |token: String| {
        let grpc = edge.grpc.clone();
        async move {
            let mut c = pb::tunnel_service_client::TunnelServiceClient::connect(grpc)
                .await
                .unwrap();
            let req = pb::WatchEventsRequest {
                kinds: vec!["session_opened".into()],
                ..Default::default()
            };
            c.watch_events(bearer(req, &token))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut admin_events = watch(admin_token).await;
    let mut alice_events = watch(alice_token).await;
    // A session on a target alice may not read, then one on a target she may.
    let (_t1, hidden, _) = edge.tunnel(&admin, "forbidden").await;
    let (_t2, shown, _) = edge.tunnel(&admin, "echo").await;
    let a1 = next_event(&mut admin_events).await;
    let a2 = next_event(&mut admin_events).await;
    assert_eq!(
        (a1.session_id.as_str(), a2.session_id.as_str()),
        (hidden.session_id.as_str(), shown.session_id.as_str())
    );
    assert_eq!(a1.kind, "session_opened");
    let first_for_alice = next_event(&mut alice_events).await;
    assert_eq!(
        first_for_alice.session_id, shown.session_id,
        "alice must not see sessions of targets she may not reach"
    );
    // Watching is audited.
    edge.wait_record(
        "watch audit",
        |r| matches!(&r.body, Body::Audit(a) if a.action == "watch_events" && a.actor == "alice"),
    )
    .await;
    edge.stop().await;
}
