//! The CA directory end to end: init, sign, chain, rotate, refuse.

use std::time::{Duration, SystemTime};

use weft_identity::{CaDir, CertInfo, CsrError, Issuer, Name, TokenKey, new_csr, verify_signed_by};

fn name(s: &str) -> Name {
    s.parse().expect("valid name")
}

fn init() -> (tempfile::TempDir, CaDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = CaDir::new(tmp.path().join("ca"));
    dir.init(&name("weft.local"), false).expect("init");
    (tmp, dir)
}

fn anchor(dir: &CaDir) -> Vec<u8> {
    weft_identity::read_pem_certs(&dir.anchor_cert()).expect("anchor")[0].to_vec()
}

#[test]
fn init_writes_a_chain_that_signs_leaves_for_the_named_identity() {
    let (_tmp, dir) = init();
    let issuer = Issuer::load(&dir).expect("issuer loads");
    verify_signed_by(issuer.cert(), &anchor(&dir)).expect("issuer chains to the anchor");

    let (_key, csr) = new_csr(&name("web.demo")).expect("csr");
    let now = SystemTime::now();
    let leaf = issuer
        .certify(&csr, &name("web.demo"), Duration::from_secs(3600), now)
        .expect("signed");
    verify_signed_by(&leaf.der, issuer.cert()).expect("leaf chains to the issuer");
    let info = CertInfo::parse(&leaf.der).expect("parses");
    assert_eq!(info.dns_names, vec!["web.demo".to_string()]);
    assert!(!info.is_ca);
    let lifetime = info.not_after.duration_since(now).expect("in the future");
    assert!(lifetime <= Duration::from_secs(3600) && lifetime > Duration::from_secs(3500));

    // Keys are private to their owner.
    use std::os::unix::fs::PermissionsExt;
    for key in [
        dir.anchor_key().to_path_buf(),
        dir.issuer_key(),
        dir.token_key(),
    ] {
        let mode = std::fs::metadata(&key)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{} is readable by others", key.display());
    }
    let token_key = std::fs::read_to_string(dir.token_key()).expect("token key");
    TokenKey::from_hex(&token_key).expect("token key parses");
}

#[test]
fn a_csr_for_another_name_is_refused() {
    let (_tmp, dir) = init();
    let issuer = Issuer::load(&dir).expect("issuer loads");
    let (_key, csr) = new_csr(&name("api.demo")).expect("csr");
    let err = issuer
        .certify(
            &csr,
            &name("web.demo"),
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .expect_err("refused");
    assert!(matches!(err, CsrError::WrongNames { .. }), "{err}");
    assert!(err.to_string().contains("api.demo"), "{err}");
    let err = issuer
        .certify(
            b"garbage",
            &name("web.demo"),
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .expect_err("refused");
    assert!(matches!(err, CsrError::Invalid(_)), "{err}");
}

#[test]
fn init_refuses_to_replace_an_anchor_without_force() {
    let (_tmp, dir) = init();
    let before = anchor(&dir);
    let err = dir.init(&name("weft.local"), false).expect_err("refused");
    assert!(err.to_string().contains("ca.crt already exists"), "{err}");
    assert_eq!(anchor(&dir), before);
    dir.init(&name("weft.local"), true).expect("forced");
    assert_ne!(anchor(&dir), before);
}

#[test]
fn a_rotated_issuer_still_chains_to_the_same_anchor() {
    let (_tmp, dir) = init();
    let old = Issuer::load(&dir).expect("issuer");
    dir.rotate_issuer(&name("weft.local")).expect("rotated");
    let new = Issuer::load(&dir).expect("issuer");
    assert_ne!(old.cert(), new.cert());
    verify_signed_by(new.cert(), &anchor(&dir)).expect("new issuer chains to the anchor");
}

#[test]
fn a_mismatched_issuer_key_is_named() {
    let (_tmp, dir) = init();
    std::fs::copy(dir.anchor_key(), dir.issuer_key()).expect("copy");
    let err = Issuer::load(&dir).expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("issuer.key") && text.contains("does not belong"),
        "{text}"
    );
    std::fs::write(dir.issuer_cert(), "not pem").expect("write");
    let err = Issuer::load(&dir).expect_err("refused");
    assert!(err.to_string().contains("issuer.crt"), "{err}");
}

#[test]
fn the_anchor_key_is_kept_out_of_the_served_directory() {
    let (tmp, dir) = init();
    assert!(
        !dir.anchor_key().starts_with(&dir.dir),
        "{:?}",
        dir.anchor_key()
    );
    assert!(dir.anchor_key().exists());
    dir.check_served().expect("nothing secret served");
    // An anchor key inside (a layout from before, or a careless copy) is
    // refused, and the error says how to fix it.
    let inside = dir.dir.join("ca.key");
    std::fs::copy(dir.anchor_key(), &inside).expect("copy");
    let err = dir.check_served().expect_err("refused").to_string();
    assert!(
        err.contains(&inside.display().to_string()) && err.contains("move it"),
        "{err}"
    );
    // init refuses to put it there in the first place.
    let bad = CaDir::with_anchor_key(tmp.path().join("ca2"), tmp.path().join("ca2/ca.key"));
    let err = bad.init(&name("weft.local"), false).expect_err("refused");
    assert!(err.to_string().contains("must be outside"), "{err}");
    // Rotation reads the key from where it was put.
    dir.rotate_issuer(&name("weft.local")).expect("rotated");
}

#[test]
fn keys_readable_by_others_are_refused_by_name_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (_tmp, dir) = init();
    for (mode, who) in [(0o640, "its group"), (0o604, "others")] {
        std::fs::set_permissions(dir.issuer_key(), std::fs::Permissions::from_mode(mode))
            .expect("chmod");
        let err = Issuer::load(&dir).expect_err("refused").to_string();
        assert!(
            err.contains("issuer.key") && err.contains(&format!("{mode:04o}")) && err.contains(who),
            "{err}"
        );
    }
    std::fs::set_permissions(dir.token_key(), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let err = dir.read_token_key().expect_err("refused").to_string();
    assert!(err.contains("token.key") && err.contains("0644"), "{err}");
}

#[test]
fn a_leftover_temporary_file_cannot_loosen_a_key() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = CaDir::new(tmp.path().join("ca"));
    std::fs::create_dir_all(&dir.dir).expect("mkdir");
    // The name every file once shared as its temporary, world-readable.
    for leftover in ["issuer.tmp", "token.tmp", "ca.tmp"] {
        let path = dir.dir.join(leftover);
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    }
    dir.init(&name("weft.local"), false).expect("init");
    for key in [
        dir.issuer_key(),
        dir.token_key(),
        dir.anchor_key().to_path_buf(),
    ] {
        let mode = std::fs::metadata(&key)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let mode = std::fs::metadata(dir.anchor_cert())
        .expect("exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    let stray: Vec<_> = std::fs::read_dir(&dir.dir)
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.ends_with(".tmp") && !["issuer.tmp", "token.tmp", "ca.tmp"].contains(&n.as_str())
        })
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// A CSR with many names gets a short answer: beyond 4 KiB it is not even
/// parsed, and below that the error names the count and the first three.
#[test]
fn a_csr_with_many_names_is_refused_in_a_few_words() {
    let (_tmp, dir) = init();
    let issuer = Issuer::load(&dir).expect("issuer loads");
    let csr_with = |n: usize| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = (0..n)
            .map(|i| {
                rcgen::SanType::DnsName(
                    rcgen::string::Ia5String::try_from(format!("n{i}.demo")).expect("ia5"),
                )
            })
            .collect();
        params.serialize_request(&key).expect("csr").der().to_vec()
    };
    for (n, want) in [
        (3000, "bytes; a workload's is under 4096"),
        (
            20,
            "but names 20: [\"n0.demo\", \"n1.demo\", \"n2.demo\"] and more",
        ),
    ] {
        let csr = csr_with(n);
        let err = issuer
            .certify(
                &csr,
                &name("web.demo"),
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .expect_err("refused")
            .to_string();
        assert!(err.contains(want), "{n}: {err}");
        assert!(err.len() < 300, "{n} names: {} bytes of error", err.len());
    }
    assert!(csr_with(3000).len() > weft_identity::MAX_CSR_BYTES);
}
