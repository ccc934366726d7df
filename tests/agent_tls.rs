//! The agent API over TLS with real certificates (made by openssl the way the chart makes them):
//! the controller reaches agents over mutual TLS; a caller without a client certificate, with one
//! from another CA, in plaintext or without the token is refused; and a node or controller whose
//! TLS files are missing or wrong does not start, naming the flag and the file.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use strata::agent::auth::{AddToken, Token};
use strata::proto::agent::agent_client::AgentClient;
use strata::proto::agent::GetNodeInfoRequest;
use strata::proto::csi as pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How a test client reaches the agent.
struct Caller<'a> {
    /// CA it verifies the agent with; `None` for plaintext.
    ca: Option<&'a Path>,
    /// Its certificate and key.
    identity: Option<(&'a Path, &'a Path)>,
    /// Whether it sends the token.
    token: bool,
}

/// One GetNodeInfo call to the agent at `addr`, as `caller`.
async fn call(addr: &str, caller: Caller<'_>) -> Result<String, tonic::Status> {
    let read = |p: &Path| std::fs::read(p).unwrap();
    let ep = match caller.ca {
        Some(ca) => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)))
                .domain_name(strata::agent::tls::DEFAULT_SERVER_NAME);
            if let Some((cert, key)) = caller.identity {
                tls = tls.identity(Identity::from_pem(read(cert), read(key)));
            }
            Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
        }
        None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
    };
    let channel = ep
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    let token = if caller.token {
        Token::new(TOKEN).unwrap()
    } else {
        // A well-formed token that is not the agents'.
        Token::generate()
    };
    AgentClient::with_interceptor(channel, AddToken(token))
        .get_node_info(GetNodeInfoRequest {})
        .await
        .map(|r| r.into_inner().node_name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reaches_agents_over_mutual_tls_and_others_are_refused() {
    let certs = tempfile::tempdir().unwrap();
    let tls = make_tls(certs.path());
    let bed = TestBed::start_spec(BedSpec {
        nodes: vec![("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None)],
        tls: Some(tls.clone()),
        ..Default::default()
    })
    .await;

    // The controller's whole path to the agent: create, find and delete a volume.
    let mut ctl = bed.controller().await;
    let v = ctl
        .create_volume(create_req("over-tls", 64 * MIB, mount_cap("ext4")))
        .await
        .expect("CreateVolume through the agent over TLS")
        .into_inner()
        .volume
        .unwrap();
    assert!(bed.nodes[0].storage.join("volumes").join(&v.volume_id).exists());
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: Default::default(),
    })
    .await
    .expect("DeleteVolume through the agent over TLS");
    assert!(!bed.nodes[0].storage.join("volumes").join(&v.volume_id).exists());

    let addr = format!("{}:{}", bed.nodes[0].agent_host, bed.nodes[0].agent_port);
    let cert = (tls.cert.as_path(), tls.key.as_path());

    // The same certificate the controller holds, and the token: served.
    let ok = Caller {
        ca: Some(&tls.ca),
        identity: Some(cert),
        token: true,
    };
    assert_eq!(call(&addr, ok).await.unwrap(), "node-a");

    // No client certificate: the handshake fails, the token alone does not open the API.
    let no_cert = Caller {
        ca: Some(&tls.ca),
        identity: None,
        token: true,
    };
    let e = call(&addr, no_cert).await.unwrap_err();
    // TLS 1.3: the client finishes its side of the handshake before the server judges the client
    // certificate, so it sees either the server's alert or the connection closed under it —
    // never an answer, never the token check.
    let text = format!("{e:?}");
    assert!(
        text.contains("CertificateRequired")
            || (matches!(
                e.code(),
                tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
            ) && text.contains("connection closed")),
        "{e:?}"
    );

    // A certificate (with the right name) from another CA: refused.
    let other_ca = make_ca(certs.path(), "other-ca");
    let (ocert, okey) = make_cert(
        certs.path(),
        "other",
        strata::agent::tls::DEFAULT_SERVER_NAME,
        &other_ca,
    );
    let foreign = Caller {
        ca: Some(&tls.ca),
        identity: Some((&ocert, &okey)),
        token: true,
    };
    let e = call(&addr, foreign).await.unwrap_err();
    // Refused by the handshake, before the token is looked at.
    assert_ne!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // A client that trusts another CA does not accept the agent.
    let wrong_trust = Caller {
        ca: Some(&other_ca.0),
        identity: Some(cert),
        token: true,
    };
    let e = call(&addr, wrong_trust).await.unwrap_err();
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");

    // Plaintext to the TLS port: refused.
    let plain = Caller {
        ca: None,
        identity: None,
        token: true,
    };
    let e = call(&addr, plain).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // A valid certificate without the token: still unauthenticated.
    let no_token = Caller {
        ca: Some(&tls.ca),
        identity: Some(cert),
        token: false,
    };
    assert_eq!(
        call(&addr, no_token).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    // A controller that trusts another CA reaches no agent, and says why.
    let socket = bed.dir.join("wrong-ca-controller.sock");
    let mut wrong = Command::new(BIN)
        .arg("controller")
        .arg(format!("--csi-endpoint={}", socket.display()))
        .arg(format!("--agents=node-a={addr}"))
        .arg(format!(
            "--agent-token-file={}",
            bed.dir.join("agent.token").display()
        ))
        .arg(format!("--agent-tls-ca={}", other_ca.0.display()))
        .arg(format!("--agent-tls-cert={}", tls.cert.display()))
        .arg(format!("--agent-tls-key={}", tls.key.display()))
        .env_remove("STRATA_AGENT_TOKEN")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(strata::client::wait_for_socket(&socket, Duration::from_secs(20)).await);
    let mut ctl =
        pb::controller_client::ControllerClient::new(strata::client::connect_unix(&socket).await.unwrap());
    let e = ctl
        .create_volume(create_req("wrong-ca", 64 * MIB, mount_cap("ext4")))
        .await
        .unwrap_err();
    wrong.kill().unwrap();
    wrong.wait().unwrap();
    assert!(
        e.message().contains("invalid peer certificate: UnknownIssuer"),
        "the refusal does not say why: {e:?}"
    );

    let logs = bed.logs();
    assert!(
        logs.contains("mutual TLS"),
        "the node does not say it serves mutual TLS"
    );
    assert!(!logs.contains(TOKEN), "the token reached a log");
    let key = std::fs::read_to_string(&tls.key).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    assert!(!logs.contains(key_line), "the private key reached a log");
}

/// Runs `strata <args>` to its end (it must end by itself, quickly) and returns (success, stderr).
fn run_to_exit(args: &[String], envs: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("STRATA_AGENT_TOKEN")
        .env_remove("STRATA_AGENT_INSECURE")
        .env_remove("POD_IP")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("strata {args:?} did not stop: it started without its TLS files");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_or_wrong_tls_files_stop_the_start_with_flag_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let tls = make_tls(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file").unwrap();
    let missing = dir.path().join("missing/tls.crt");
    let other = make_cert(
        dir.path(),
        "other",
        "strata-agent",
        &make_ca(dir.path(), "other-ca"),
    );
    let node = |extra: &[String]| {
        let mut a = vec![
            "node".to_string(),
            format!("--csi-endpoint={}", dir.path().join("node.sock").display()),
            "--node-name=node-a".into(),
            "--zone=zone-a".into(),
            format!("--storage-dir={}", dir.path().join("storage").display()),
            format!("--agent-token-file={}", token.display()),
            format!("--agent-listen=127.0.0.1:{}", free_port()),
        ];
        a.extend_from_slice(extra);
        a
    };
    let flag = |f: &str, p: &Path| format!("--agent-tls-{f}={}", p.display());
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            node(&[flag("cert", &missing), flag("key", &tls.key)]),
            vec![
                format!("--agent-tls-cert {}", missing.display()),
                "No such file".into(),
            ],
        ),
        (
            node(&[flag("cert", &tls.cert), flag("key", &garbage)]),
            vec![
                format!("--agent-tls-key {}", garbage.display()),
                "no PEM private key".into(),
            ],
        ),
        (
            // A key that is not the certificate's.
            node(&[flag("cert", &tls.cert), flag("key", &other.1)]),
            vec![
                format!("--agent-tls-key {}", other.1.display()),
                "does not fit".into(),
            ],
        ),
        (
            node(&[
                flag("cert", &tls.cert),
                flag("key", &tls.key),
                flag("ca", &garbage),
            ]),
            vec![format!("--agent-tls-ca {}", garbage.display())],
        ),
        (
            node(&[]),
            vec!["--agent-insecure".into(), "--agent-tls-cert".into()],
        ),
        (
            node(&["--agent-insecure".into(), flag("cert", &tls.cert)]),
            vec!["--agent-insecure excludes".into()],
        ),
        (
            vec![
                "controller".into(),
                format!("--csi-endpoint={}", dir.path().join("ctl.sock").display()),
                "--agents=node-a=127.0.0.1:1".into(),
                format!("--agent-token-file={}", token.display()),
                flag("ca", &missing),
            ],
            vec![format!("--agent-tls-ca {}", missing.display())],
        ),
        (
            vec![
                "controller".into(),
                format!("--csi-endpoint={}", dir.path().join("ctl.sock").display()),
                "--agents=node-a=127.0.0.1:1".into(),
                format!("--agent-token-file={}", token.display()),
            ],
            vec!["--agent-tls-ca".into(), "--agent-insecure".into()],
        ),
    ];
    for (args, says) in cases {
        let (ok, err) = run_to_exit(&args, &[]);
        assert!(!ok, "strata {args:?} succeeded");
        assert!(!err.contains("panicked"), "strata {args:?} panicked: {err}");
        for s in &says {
            assert!(err.contains(s.as_str()), "strata {args:?}: {s:?} not in: {err}");
        }
    }

    // No listen address and no POD_IP: never all addresses, a clear refusal instead.
    let mut args = node(&["--agent-insecure".into()]);
    args.retain(|a| !a.starts_with("--agent-listen"));
    let (ok, err) = run_to_exit(&args, &[]);
    assert!(!ok);
    assert!(err.contains("--agent-listen"), "{err}");
    assert!(err.contains("POD_IP"), "{err}");
}
