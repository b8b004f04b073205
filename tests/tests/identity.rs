//! The security boundary of the sync connection, driven by a hand-rolled QUIC client so the test
//! controls every byte the "agent" sends: certificates from another CA are refused at the
//! handshake, a site's identity comes from its certificate, and events that claim another site are
//! refused without storing anything.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use outpost_protocol::*;
use outpost_tests::quic_client::{
    client_config, milestone_event, open, read_cert as read, site_client_config,
};
use outpost_tests::*;

fn hello(site: &str, version: u16) -> AgentMsg {
    outpost_tests::quic_client::hello(site, version, 1)
}

/// A CA and a site certificate that look right (same site name) but were not issued by the fleet CA.
fn rogue_site_cert(site: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    use rcgen::*;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "Outpost Fleet CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name.push(DnType::CommonName, site);
    leaf.subject_alt_names = vec![SanType::URI(identity::site_uri(site).try_into()?)];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}

/// Goal: a certificate from another CA never gets a session, even naming a real site; the fleet's
/// own certificate for the same site does (positive control, so the test can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let addr: SocketAddr = central.ready.quic.clone().context("quic")?.parse()?;
    let ca = read(fleet.path(), "ca.pem")?;

    let (rogue_cert, rogue_key) = rogue_site_cert("plant-1")?;
    let refused = async {
        let mut s = open(addr, client_config(&ca, &rogue_cert, &rogue_key)?).await?;
        s.send(&hello("plant-1", PROTOCOL_VERSION)).await?;
        s.recv().await
    }
    .await;
    match refused {
        Ok(msg) => panic!("central answered a rogue certificate with {msg:?}"),
        Err(e) => {
            let text = format!("{e:#}");
            eprintln!("refused as expected: {text}");
            assert!(
                !text.contains("timed out") && !text.contains("deadline"),
                "refusal must be an explicit handshake error, not a timeout: {text}"
            );
            assert!(
                text.contains("certificate"),
                "the reason names the certificate: {text}"
            );
        }
    }

    let mut good = open(
        addr,
        client_config(
            &ca,
            &read(fleet.path(), "plant-1.pem")?,
            &read(fleet.path(), "plant-1.key")?,
        )?,
    )
    .await?;
    good.send(&hello("plant-1", PROTOCOL_VERSION)).await?;
    assert!(matches!(good.recv().await?, CentralMsg::Welcome(_)));
    Ok(())
}

/// Goal: identity is the certificate. A hello naming another site, an event claiming another site
/// and an incompatible protocol version are each refused with a reason and store nothing; events
/// sent under plant-1's certificate are attributed to plant-1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_identity_comes_from_the_certificate() -> Result<()> {
    let fleet = Fleet::init(3)?;
    let central = fleet.start_central(None)?;
    let c = Api::new(&central);
    let addr: SocketAddr = central.ready.quic.clone().context("quic")?.parse()?;
    let dir = fleet.path();
    let cfg = || site_client_config(dir, "plant-1");

    // plant-1's certificate, hello claiming plant-2.
    let mut s = open(addr, cfg()?).await?;
    s.send(&hello("plant-2", PROTOCOL_VERSION)).await?;
    match s.recv().await? {
        CentralMsg::Refuse(r) => assert_eq!(r.code, RefuseCode::WrongSite, "{}", r.reason),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Wrong protocol version.
    let mut s = open(addr, cfg()?).await?;
    s.send(&hello("plant-1", PROTOCOL_VERSION + 1)).await?;
    match s.recv().await? {
        CentralMsg::Refuse(r) => {
            assert_eq!(r.code, RefuseCode::IncompatibleVersion);
            assert!(
                r.reason.contains(&PROTOCOL_VERSION.to_string()),
                "{}",
                r.reason
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Correct hello, then an event claiming plant-2: refused, nothing stored.
    let mut s = open(addr, cfg()?).await?;
    s.send(&hello("plant-1", PROTOCOL_VERSION)).await?;
    let CentralMsg::Welcome(w) = s.recv().await? else {
        bail!("no welcome")
    };
    assert_eq!(w.acked_seq, 0);
    s.send(&AgentMsg::Events(vec![milestone_event(
        "plant-2", 1, "forged-1",
    )]))
    .await?;
    loop {
        match s.recv().await? {
            CentralMsg::Master(_) => continue,
            CentralMsg::Refuse(r) => {
                assert!(
                    matches!(
                        r.code,
                        RefuseCode::WrongSite | RefuseCode::ProtocolViolation
                    ),
                    "{r:?}"
                );
                break;
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(
        read_feed(&c).await?.is_empty(),
        "a forged event stored nothing"
    );

    // The same connection identity with honest events is accepted and attributed to plant-1.
    let mut s = open(addr, cfg()?).await?;
    s.send(&hello("plant-1", PROTOCOL_VERSION)).await?;
    let CentralMsg::Welcome(_) = s.recv().await? else {
        bail!("no welcome")
    };
    s.send(&AgentMsg::Events(vec![milestone_event(
        "plant-1", 1, "honest-1",
    )]))
    .await?;
    loop {
        match s.recv().await? {
            CentralMsg::Master(_) => continue,
            CentralMsg::Ack { through_seq } => {
                assert_eq!(through_seq, 1);
                break;
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    // Re-sending the same event after a "lost ack" is recognised as a duplicate.
    s.send(&AgentMsg::Events(vec![milestone_event(
        "plant-1", 1, "honest-1",
    )]))
    .await?;
    loop {
        match s.recv().await? {
            CentralMsg::Master(_) => continue,
            CentralMsg::Ack { through_seq } => {
                assert_eq!(through_seq, 1);
                break;
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let feed = read_feed(&c).await?;
    assert_eq!(feed.len(), 1, "{feed:?}");
    assert_eq!(feed[0]["site"], "plant-1");
    assert_eq!(feed[0]["id"], "honest-1");
    s.conn.close(0u32.into(), b"done");
    Ok(())
}
