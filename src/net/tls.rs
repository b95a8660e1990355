//! TLS material (the cluster's two CAs, node certificates, user credentials), the identities
//! a node reads off a verified certificate, and the rustls side of each QUIC endpoint; the
//! transport limits are in [`super::quic`].
//!
//! Two certificate authorities, made by the operator (`convoy tls init`):
//! - the **node CA** signs one certificate per node (SAN `node{N}`, `localhost`, 127.0.0.1).
//!   Peer links are mutual TLS under it, so only nodes can speak Raft, and a peer's
//!   certificate names the node it may speak for; clients verify the node they dial
//!   against it.
//! - the **client CA** signs user credentials (`convoy user add NAME`). The user id is in the
//!   certificate (SAN URI `urn:convoy:user:NAME`), and an operator credential carries the
//!   admin role too (`urn:convoy:role:admin`). A node's client endpoint requires a
//!   certificate under it: a user credential cannot open a peer link, and a node certificate
//!   is not a user credential.
//!
//! Layout: the CA keys (and a copy of each CA certificate) live in `ca_dir`, which only the
//! operator's commands read; `tls_dir` holds what nodes and clients read: both CA
//! certificates, `nodes/node{N}/{cert,key}.pem` and `users/NAME/{cert,key}.pem`. Every
//! private key is created with mode 0600 (never chmod-ed after the fact), and every
//! credential is written to a temporary directory and renamed into place whole, so
//! concurrent commands agree on one CA and a certificate always matches its key. Only the
//! ring crypto provider is compiled in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use super::quic::Link;
use super::quic::{dialer_transport, server_transport};
use crate::config::Config;
use crate::error::{Error, Result};

/// ALPN of node↔node links.
pub const ALPN_PEER: &[u8] = b"convoy-peer/1";
/// ALPN of client↔node links.
pub const ALPN_CLIENT: &[u8] = b"convoy-client/1";
/// SAN URI prefix that names a credential's user.
pub const USER_URI_PREFIX: &str = "urn:convoy:user:";
/// SAN URI of the admin role.
pub const ADMIN_URI: &str = "urn:convoy:role:admin";
/// The shortest interval between two stateless resets of one endpoint: none (see
/// [`endpoint_config`]).
pub const STATELESS_RESET_INTERVAL: std::time::Duration = std::time::Duration::ZERO;
/// The operator credential `convoy tls init` makes.
pub const ADMIN_USER: &str = "admin";
/// Longest user name a credential may carry.
pub const USER_NAME_MAX: usize = 64;

/// A TLS failure while doing `context`, keeping its cause.
fn tls_err<E: Into<crate::error::BoxError>>(context: impl Into<String>) -> impl FnOnce(E) -> Error {
    let context = context.into();
    move |e| Error::Tls { context, source: e.into() }
}

/// The server name a node's certificate is issued for.
pub fn node_name(id: u64) -> String {
    format!("node{id}")
}

/// Checks a user name for a credential: 1..=64 of `A-Z a-z 0-9 . _ -`, not starting with a
/// dot (it names a directory).
pub fn validate_user_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= USER_NAME_MAX
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "user name {name:?}: 1..={USER_NAME_MAX} of A-Z a-z 0-9 . _ -, not starting with a dot"
        )))
    }
}

/// Paths of the material: `dir` (what nodes and clients read) and `ca_dir` (the CA keys).
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
}

impl TlsPaths {
    pub fn of(config: &Config) -> TlsPaths {
        TlsPaths { dir: config.tls_dir.clone(), ca_dir: config.ca_dir.clone() }
    }
    pub fn node_ca(&self) -> PathBuf {
        self.dir.join("node-ca.pem")
    }
    pub fn client_ca(&self) -> PathBuf {
        self.dir.join("client-ca.pem")
    }
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join("nodes").join(node_name(id))
    }
    pub fn node_cert(&self, id: u64) -> PathBuf {
        self.node_dir(id).join("cert.pem")
    }
    pub fn node_key(&self, id: u64) -> PathBuf {
        self.node_dir(id).join("key.pem")
    }
    pub fn user_dir(&self, name: &str) -> PathBuf {
        self.dir.join("users").join(name)
    }
    /// The revoked client certificates, one per line (`convoy user revoke`).
    pub fn revoked(&self) -> PathBuf {
        self.dir.join("revoked")
    }
}

/// The files of one user's credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Credential {
    /// `<tls_dir>/users/NAME`'s credential, which must exist.
    pub fn of_user(config: &Config, name: &str) -> Result<Credential> {
        validate_user_name(name)?;
        let dir = TlsPaths::of(config).user_dir(name);
        let c = Credential { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        if !c.cert.exists() || !c.key.exists() {
            return Err(Error::Config(format!(
                "no credential for user {name:?} in {}: the operator makes one with `convoy user add {name} --config {}`",
                dir.display(),
                config.path.display()
            )));
        }
        Ok(c)
    }

    /// The user a credential's certificate names.
    pub fn user(&self) -> Result<String> {
        let certs = load_certs(&self.cert)?;
        let first =
            certs.first().ok_or_else(|| Error::Config(format!("{} holds no certificate", self.cert.display())))?;
        Ok(identity_of_cert(first)?.user)
    }
}

/// Who a verified client certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub admin: bool,
}

/// A DER certificate, parsed.
fn parsed(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Protocol(format!("unreadable certificate: {e}")))?;
    Ok(cert)
}

/// The subject alternative names of a certificate: (DNS names, URIs).
fn sans_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let (mut dns, mut uris) = (Vec::new(), Vec::new());
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(s) => dns.push(s.to_string()),
                x509_parser::extensions::GeneralName::URI(s) => uris.push(s.to_string()),
                _ => {}
            }
        }
    }
    (dns, uris)
}

fn identity_of_cert(der: &[u8]) -> Result<Identity> {
    identity_in(&parsed(der)?)
}

fn identity_in(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Identity> {
    let (_, uris) = sans_of(cert);
    let mut users = uris.iter().filter_map(|u| u.strip_prefix(USER_URI_PREFIX));
    let (Some(user), None) = (users.next(), users.next()) else {
        return Err(Error::Forbidden("the certificate does not name exactly one user".into()));
    };
    validate_user_name(user).map_err(|e| Error::Forbidden(e.to_string()))?;
    Ok(Identity { user: user.to_string(), admin: uris.iter().any(|u| u == ADMIN_URI) })
}

/// The leaf certificate a connection's peer presented (verified by the handshake).
fn peer_leaf(conn: &quinn::Connection) -> Result<CertificateDer<'static>> {
    let identity = conn.peer_identity().ok_or_else(|| Error::Forbidden("no peer certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| Error::Forbidden("unexpected peer identity type".into()))?;
    chain.into_iter().next().ok_or_else(|| Error::Forbidden("empty peer certificate chain".into()))
}

/// The user a client connection's verified certificate names, and its key's
/// [`key_fingerprint`] (what a revocation lists), from one parse of the certificate.
pub fn credential_of(conn: &quinn::Connection) -> Result<(Identity, String)> {
    let leaf = peer_leaf(conn)?;
    let cert = parsed(&leaf)?;
    Ok((identity_in(&cert)?, fingerprint_of(&cert)))
}

/// The fingerprint a revocation lists: the SHA-256 of the certificate's public key (its
/// SubjectPublicKeyInfo), in lowercase hex. Not of the whole certificate: an ECDSA signature
/// has a second valid encoding, so a thief could re-encode a revoked certificate's signature
/// into one with other bytes that still verifies. What was leaked is the key, and a new
/// credential has a new one.
pub fn key_fingerprint(der: &[u8]) -> Result<String> {
    Ok(fingerprint_of(&parsed(der)?))
}

fn fingerprint_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The revoked keys: a set of [`key_fingerprint`]s.
pub type RevokedKeys = std::collections::HashSet<String>;

/// The revoked keys as a node last read them (`server::watch_revoked` publishes them).
pub type Revoked = std::sync::Arc<RevokedKeys>;

/// Resolves once a list `revoked` publishes after the one last seen holds `fingerprint`;
/// never, once the publisher is gone. Cancel-safe, so a connection's accept loop can race
/// it against its next stream, and close the connection when it wins.
pub async fn revoked_later(revoked: &mut tokio::sync::watch::Receiver<Revoked>, fingerprint: &str) {
    loop {
        if revoked.changed().await.is_err() {
            return std::future::pending().await;
        }
        if revoked.borrow_and_update().contains(fingerprint) {
            return;
        }
    }
}

/// A revocation list read again and again, keeping the last one that read: a revocation
/// must not be lifted by a bad edit. Each distinct failure is logged once.
#[derive(Debug)]
pub struct RevocationList {
    path: PathBuf,
    keys: std::sync::Arc<RevokedKeys>,
    failing: Option<String>,
}

impl RevocationList {
    /// The list at `path`, which must read (no file: nothing is revoked).
    pub fn open(path: PathBuf) -> Result<RevocationList> {
        let keys = std::sync::Arc::new(read_revoked(&path)?);
        Ok(RevocationList { path, keys, failing: None })
    }

    /// Reads the list again; true if its keys changed.
    pub fn refresh(&mut self) -> bool {
        match read_revoked(&self.path) {
            Ok(keys) => {
                self.failing = None;
                if *self.keys == keys {
                    return false;
                }
                tracing::info!(revoked = keys.len(), path = %self.path.display(), "the revocation list changed");
                self.keys = std::sync::Arc::new(keys);
                true
            }
            Err(e) => {
                let e = e.to_string();
                if self.failing.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "reading the revocation list; the last list read stays");
                    self.failing = Some(e);
                }
                false
            }
        }
    }

    /// The keys as last read.
    pub fn keys(&self) -> std::sync::Arc<RevokedKeys> {
        self.keys.clone()
    }

    /// Where the list is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The fingerprints in a revocation file: one per line, first on it (the rest of the line,
/// the user's name and when, is for the operator). No file: nothing is revoked. A line that
/// does not start with a fingerprint is an error, naming the line: a revocation misread
/// would let a credential in.
pub fn read_revoked(path: &Path) -> Result<RevokedKeys> {
    match revocation_text(path)? {
        Some(text) => parse_revoked(path, &text),
        None => Ok(Default::default()),
    }
}

/// A revocation file's text; `None` when there is no file.
fn revocation_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Config(format!("reading {}: {e}", path.display()))),
    }
}

/// The fingerprints in `text`, read from `path` (named in errors); see [`read_revoked`].
fn parse_revoked(path: &Path, text: &str) -> Result<RevokedKeys> {
    let mut out = RevokedKeys::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fp = line.split_whitespace().next().unwrap_or("");
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Config(format!(
                "{} line {}: {fp:?} is not a SHA-256 key fingerprint (64 hex digits)",
                path.display(),
                i + 1
            )));
        }
        out.insert(fp.to_ascii_lowercase());
    }
    Ok(out)
}

/// What `convoy user revoke` or `convoy tls revoke-node` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The user, or the node (`node{N}`), whose key was revoked.
    pub user: String,
    pub fingerprint: String,
    pub file: PathBuf,
}

/// Revokes `name`'s credential (an operator command): its key's fingerprint is added to
/// `<tls_dir>/revoked`, which every node reads again within a second, refusing the key and
/// closing the connections that presented it; then the credential's files are deleted, so
/// `convoy user add NAME` issues a new one (with a new key). The user's memberships, cursors
/// and messages stay: they belong to the name, not the key.
///
/// Revocations are serialized by a lock on `<tls_dir>/revoked.lock`, so two at once both
/// land; the list is renamed into place whole and its directory synced, and read back
/// before the files go: a revocation is never lost with the files needed to make it again.
pub fn revoke_user(config: &Config, name: &str) -> Result<Revocation> {
    validate_user_name(name)?;
    let paths = TlsPaths::of(config);
    // Taken before the credential is read: `user add`, which issues a credential, takes it
    // too, so the files deleted below are the ones whose key is listed.
    let lock = revocation_lock(&paths)?;
    let fp = user_key_fingerprint(config, name)?;
    let file = list_revoked(&paths, &fp, name)?;
    std::fs::remove_dir_all(paths.user_dir(name))?;
    drop(lock);
    Ok(Revocation { user: name.to_string(), fingerprint: fp, file })
}

/// Revokes node `id`'s certificate (an operator command, for a node key that leaked or a
/// node host that is gone): its key's fingerprint is added to `<tls_dir>/revoked` as a
/// user's is, and every node reads it within a second. Nodes then refuse peer connections
/// that present that key, close the ones that did, and never dial into a node that presents
/// it. The certificate's files are deleted; `convoy tls init` issues the node a new one
/// (a new key), with which it joins again once restarted. Locked and written as
/// [`revoke_user`] is. What the node stored stays.
pub fn revoke_node(config: &Config, id: u64) -> Result<Revocation> {
    config.node(id)?;
    let paths = TlsPaths::of(config);
    let lock = revocation_lock(&paths)?;
    let fp = node_key_fingerprint(&paths, id).map_err(|e| {
        Error::Config(format!("node {id} has no certificate to revoke ({}): {e}", paths.node_cert(id).display()))
    })?;
    let file = list_revoked(&paths, &fp, &node_name(id))?;
    std::fs::remove_dir_all(paths.node_dir(id))?;
    drop(lock);
    Ok(Revocation { user: node_name(id), fingerprint: fp, file })
}

/// Adds `fp` (held by `who`, written beside it for the operator) to `<tls_dir>/revoked`
/// unless listed, and reads the list back from the disk, as nodes will. The caller holds
/// [`revocation_lock`]. Returns the list's path.
fn list_revoked(paths: &TlsPaths, fp: &str, who: &str) -> Result<PathBuf> {
    let file = paths.revoked();
    let mut text = revocation_text(&file)?
        .unwrap_or_else(|| "# Revoked keys: SHA-256 of the public key, user or node, when (unix seconds).\n".into());
    // A list that does not parse is not added to: the error names its bad line.
    if !parse_revoked(&file, &text)?.contains(fp) {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        text.push_str(&format!("{fp} {who} {now}\n"));
        // Written whole and renamed into place: a node never reads half a list.
        let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &file)?;
        std::fs::File::open(&paths.dir)?.sync_all()?;
    }
    // Read back from the disk: what nodes will read.
    if !read_revoked(&file)?.contains(fp) {
        return Err(Error::Config(format!(
            "{} does not list {fp} after writing it; nothing was deleted",
            file.display()
        )));
    }
    Ok(file)
}

/// The fingerprint of `name`'s current credential's key.
fn user_key_fingerprint(config: &Config, name: &str) -> Result<String> {
    cert_file_fingerprint(&Credential::of_user(config, name)?.cert)
}

/// The [`key_fingerprint`] of the first certificate in a PEM file.
fn cert_file_fingerprint(path: &Path) -> Result<String> {
    let certs = load_certs(path)?;
    let leaf = certs.first().ok_or_else(|| Error::Config(format!("{} holds no certificate", path.display())))?;
    key_fingerprint(leaf)
}

/// The operator's lock on users' and nodes' credentials and the revocation list
/// (`<tls_dir>/revoked.lock`), held until the returned file is dropped: a revocation and an
/// issue, or two revocations, never interleave.
fn revocation_lock(paths: &TlsPaths) -> Result<std::fs::File> {
    std::fs::create_dir_all(&paths.dir)?;
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(paths.dir.join("revoked.lock"))?;
    // SAFETY: flock on a descriptor owned by `lock`; the lock is released when it is closed.
    if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(lock)
}

/// The node a peer connection's verified certificate names (its `node{N}` SAN), and its
/// key's [`key_fingerprint`], from one parse.
pub fn peer_credential_of(conn: &quinn::Connection) -> Result<(u64, String)> {
    let leaf = peer_leaf(conn)?;
    let cert = parsed(&leaf)?;
    Ok((node_named(&sans_of(&cert).0)?, fingerprint_of(&cert)))
}

/// The key fingerprint of node `id`'s own certificate, as the operator issued it.
pub fn node_key_fingerprint(paths: &TlsPaths, id: u64) -> Result<String> {
    cert_file_fingerprint(&paths.node_cert(id))
}

/// The one node a certificate's DNS names name.
fn node_named(dns: &[String]) -> Result<u64> {
    let mut ids = dns.iter().filter_map(|d| d.strip_prefix("node")?.parse::<u64>().ok());
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        _ => Err(Error::Forbidden("the peer certificate does not name exactly one node".into())),
    }
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err("making CA parameters"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn leaf(names: Vec<String>, uris: &[String], cn: &str, issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let mut params = CertificateParams::new(names).map_err(tls_err("making certificate parameters"))?;
    for uri in uris {
        let ia5 = rcgen::string::Ia5String::try_from(uri.as_str()).map_err(tls_err("a SAN URI"))?;
        params.subject_alt_names.push(SanType::URI(ia5));
    }
    params.distinguished_name.push(DnType::CommonName, cn);
    params.use_authority_key_identifier_extension = true;
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(tls_err("generating a key"))?;
    let cert = params.signed_by(&key, issuer).map_err(tls_err("signing a certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a private key, created with mode 0600: it is never readable by others, not even
/// for a moment.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// A fresh temporary directory beside `target`, for material renamed into place whole.
fn staging(target: &Path) -> Result<PathBuf> {
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("tls");
    let tmp = parent.join(format!(".{name}.{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir(&tmp)?;
    Ok(tmp)
}

/// Renames a staged directory to `target`. `Ok(false)`: another process made it first
/// (what it made stands).
fn publish(tmp: &Path, target: &Path) -> Result<bool> {
    match std::fs::rename(tmp, target) {
        Ok(()) => Ok(true),
        Err(_) if target.exists() => {
            let _ = std::fs::remove_dir_all(tmp);
            Ok(false)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(tmp);
            Err(tls_err(format!("cannot create {}", target.display()))(e))
        }
    }
}

fn ca_issuer(paths: &TlsPaths, which: &str) -> Result<Issuer<'static, KeyPair>> {
    let cert = paths.ca_dir.join(format!("{which}-ca.pem"));
    let key = paths.ca_dir.join(format!("{which}-ca.key"));
    let no_key = |e: std::io::Error| {
        Error::Config(format!(
            "the {which} CA key {} is not readable ({e}): run this where the operator keeps the CA keys \
             (`ca_dir` in cluster.toml), after `convoy tls init`",
            key.display()
        ))
    };
    let key = KeyPair::from_pem(&std::fs::read_to_string(&key).map_err(no_key)?)
        .map_err(tls_err(format!("reading the {which} CA key")))?;
    let cert = std::fs::read_to_string(&cert)?;
    Issuer::from_ca_cert_pem(&cert, key).map_err(tls_err(format!("loading the {which} CA")))
}

/// The operator's set-up, safe to repeat: makes the two CAs in `ca_dir` if missing, copies
/// their certificates into `tls_dir`, and makes a certificate for every node of `config` and
/// the `admin` credential where missing.
pub fn init(config: &Config) -> Result<TlsPaths> {
    let paths = TlsPaths::of(config);
    if !paths.ca_dir.join("client-ca.key").exists() {
        let tmp = staging(&paths.ca_dir)?;
        for (which, cn) in [("node", "convoy node CA"), ("client", "convoy client CA")] {
            let key = KeyPair::generate().map_err(tls_err("generating a CA key"))?;
            let cert = ca_params(cn)?.self_signed(&key).map_err(tls_err("self-signing a CA"))?;
            std::fs::write(tmp.join(format!("{which}-ca.pem")), cert.pem())?;
            write_private(&tmp.join(format!("{which}-ca.key")), &key.serialize_pem())?;
        }
        publish(&tmp, &paths.ca_dir)?;
    }
    std::fs::create_dir_all(&paths.dir)?;
    for which in ["node", "client"] {
        let target = paths.dir.join(format!("{which}-ca.pem"));
        let cert = std::fs::read(paths.ca_dir.join(format!("{which}-ca.pem")))?;
        if std::fs::read(&target).ok().as_deref() != Some(cert.as_slice()) {
            let tmp = paths.dir.join(format!(".{which}-ca.{}.pem", std::process::id()));
            std::fs::write(&tmp, cert)?;
            std::fs::rename(&tmp, &target)?;
        }
    }
    let missing: Vec<u64> = config.nodes.iter().map(|n| n.id).filter(|id| !paths.node_key(*id).exists()).collect();
    if !missing.is_empty() {
        // A node revocation deletes the files it listed under this lock.
        let _one_at_a_time = revocation_lock(&paths)?;
        let issuer = ca_issuer(&paths, "node")?;
        std::fs::create_dir_all(paths.dir.join("nodes"))?;
        for id in missing {
            let names = vec![node_name(id), "localhost".into(), "127.0.0.1".into()];
            let (cert, key) = leaf(names, &[], &node_name(id), &issuer)?;
            let target = paths.node_dir(id);
            let tmp = staging(&target)?;
            std::fs::write(tmp.join("cert.pem"), cert)?;
            write_private(&tmp.join("key.pem"), &key)?;
            publish(&tmp, &target)?;
        }
    }
    ensure_user(config, ADMIN_USER, true)?;
    Ok(paths)
}

/// Issues `name`'s credential from the client CA (an operator command: it needs the CA
/// key). Fails if the user already has one.
pub fn add_user(config: &Config, name: &str, admin: bool) -> Result<Credential> {
    validate_user_name(name)?;
    let paths = TlsPaths::of(config);
    let target = paths.user_dir(name);
    if target.exists() {
        return Err(Error::InvalidInput(format!("user {name:?} already has a credential in {}", target.display())));
    }
    if !issue_user(&paths, name, admin)? {
        return Err(Error::InvalidInput(format!("user {name:?} was just given a credential by another command")));
    }
    Credential::of_user(config, name)
}

/// `name`'s credential, issued first if it has none.
pub fn ensure_user(config: &Config, name: &str, admin: bool) -> Result<Credential> {
    validate_user_name(name)?;
    let paths = TlsPaths::of(config);
    if !paths.user_dir(name).exists() {
        issue_user(&paths, name, admin)?;
    }
    Credential::of_user(config, name)
}

fn issue_user(paths: &TlsPaths, name: &str, admin: bool) -> Result<bool> {
    let _one_at_a_time = revocation_lock(paths)?;
    let issuer = ca_issuer(paths, "client")?;
    let mut uris = vec![format!("{USER_URI_PREFIX}{name}")];
    if admin {
        uris.push(ADMIN_URI.to_string());
    }
    let (cert, key) = leaf(Vec::new(), &uris, name, &issuer)?;
    let target = paths.user_dir(name);
    std::fs::create_dir_all(paths.dir.join("users"))?;
    let tmp = staging(&target)?;
    std::fs::write(tmp.join("cert.pem"), cert)?;
    write_private(&tmp.join("key.pem"), &key)?;
    publish(&tmp, &target)
}

/// What node `id` needs, which the operator must have made (`convoy tls init`).
pub fn node_material(config: &Config, id: u64) -> Result<TlsPaths> {
    let paths = TlsPaths::of(config);
    for p in [paths.node_ca(), paths.client_ca(), paths.node_cert(id), paths.node_key(id)] {
        // Opened, not only looked up: a file this user cannot read (or under a directory it
        // cannot enter) is not missing, and `tls init` would not help.
        match std::fs::File::open(&p) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Config(format!(
                    "{} is missing: make the cluster's TLS material first with `convoy tls init --config {}`",
                    p.display(),
                    config.path.display()
                )))
            }
            Err(e) => return Err(Error::Config(format!("cannot read {}: {e}", p.display()))),
        }
    }
    Ok(paths)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .map_err(tls_err(format!("reading {}", path.display())))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(tls_err(format!("reading {}", path.display())))
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(tls_err(format!("reading {}", path.display())))
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let mut store = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        store.add(cert).map_err(tls_err("adding a root certificate"))?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server config for a node's endpoint of the given link.
pub fn server_config(paths: &TlsPaths, node_id: u64, link: Link, max_streams: u32) -> Result<quinn::ServerConfig> {
    let client_roots = match link {
        Link::Peer => roots(&paths.node_ca())?,
        Link::Client => roots(&paths.client_ca())?,
    };
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(client_roots, provider())
        .build()
        .map_err(tls_err("building the client verifier"))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("choosing TLS 1.3"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&paths.node_cert(node_id))?, load_key(&paths.node_key(node_id))?)
        .map_err(tls_err("loading the node certificate"))?;
    tls.alpn_protocols = vec![match link {
        Link::Peer => ALPN_PEER.to_vec(),
        Link::Client => ALPN_CLIENT.to_vec(),
    }];
    tls.max_early_data_size = 0;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_err("making the QUIC server crypto"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(server_transport(link, max_streams)));
    Ok(config)
}

/// The endpoint config of node `id`'s server endpoints: its stateless-reset key is derived
/// from the node's private key, so it is the same after a restart. A restarted node then
/// answers packets of the connections its previous process had with a stateless reset the
/// client recognizes: clients (and peers) learn of the restart at their next packet (a client
/// pings every 3 s), not after the 10 s idle timeout, and resubscribe at once.
pub fn endpoint_config(paths: &TlsPaths, id: u64) -> Result<quinn::EndpointConfig> {
    let key = std::fs::read(paths.node_key(id))?;
    let mut seed = ring::digest::Context::new(&ring::digest::SHA256);
    seed.update(b"convoy stateless reset v1\0");
    seed.update(&key);
    let seed = seed.finish();
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    // Connection ids carry a keyed hash (quinn's default generator), but with a key that
    // survives the restart: with a fresh random key the new process drops the old
    // connections' packets as invalid ids and never resets them.
    let cid_key = u64::from_le_bytes(seed.as_ref()[..8].try_into().expect("SHA-256 has 32 bytes"));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // Every unknown packet gets its reset. quinn's limit is one gate for the whole endpoint,
    // read with a single timestamp per drain of the socket: any interval above zero answers
    // one packet per drain and drops the rest, and a client whose reset was dropped learns
    // of the restart only at its next probe, which after an outage is seconds away (probe
    // timeouts double). A reset is always smaller than the packet that caused it (quinn pads
    // it to one byte less), so answering all of them amplifies nothing; each costs one HMAC.
    config.min_reset_interval(STATELESS_RESET_INTERVAL);
    Ok(config)
}

/// Binds a node's server endpoint on `addr` with [`endpoint_config`].
pub fn bind_server(
    paths: &TlsPaths,
    id: u64,
    server: quinn::ServerConfig,
    addr: std::net::SocketAddr,
) -> Result<quinn::Endpoint> {
    crate::net::udp::endpoint(addr, endpoint_config(paths, id)?, Some(server))
}

/// Dialer config of node `id` for its peer links.
pub fn node_dialer(paths: &TlsPaths, id: u64) -> Result<quinn::ClientConfig> {
    dialer(paths, load_certs(&paths.node_cert(id))?, load_key(&paths.node_key(id))?, Link::Peer)
}

/// Dialer config of a client holding `credential`.
pub fn user_dialer(paths: &TlsPaths, credential: &Credential) -> Result<quinn::ClientConfig> {
    dialer(paths, load_certs(&credential.cert)?, load_key(&credential.key)?, Link::Client)
}

fn dialer(
    paths: &TlsPaths,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    link: Link,
) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("choosing TLS 1.3"))?
        .with_root_certificates(roots(&paths.node_ca())?)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err("loading the client certificate"))?;
    tls.alpn_protocols = vec![match link {
        Link::Peer => ALPN_PEER.to_vec(),
        Link::Client => ALPN_CLIENT.to_vec(),
    }];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_err("making the QUIC client crypto"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(dialer_transport(link)));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let text = "replication_factor = 1\ntls_dir = \"tls\"\n[[nodes]]\nid = 1\nclient_addr = \"127.0.0.1:1\"\npeer_addr = \"127.0.0.1:2\"\n\
                    data_dir = \"n1\"\n";
        Config::parse(text, dir, &dir.join("cluster.toml")).expect("config")
    }

    #[test]
    fn a_credential_names_its_user_and_keys_are_private_from_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path());
        let paths = init(&c).expect("init");
        assert!(paths.ca_dir.join("client-ca.key").exists());
        assert!(!paths.dir.join("client-ca.key").exists() && !paths.dir.join("node-ca.key").exists());
        let alice = add_user(&c, "alice", false).expect("add alice");
        assert_eq!(alice.user().expect("user"), "alice");
        let der = load_certs(&alice.cert).expect("cert").remove(0);
        assert_eq!(identity_of_cert(&der).expect("identity"), Identity { user: "alice".into(), admin: false });
        let admin = load_certs(&Credential::of_user(&c, ADMIN_USER).expect("admin").cert).expect("cert").remove(0);
        assert!(identity_of_cert(&admin).expect("identity").admin);
        let node = load_certs(&paths.node_cert(1)).expect("node cert").remove(0);
        assert!(identity_of_cert(&node).is_err(), "a node certificate names no user");
        use std::os::unix::fs::PermissionsExt;
        for key in [alice.key.clone(), paths.node_key(1), paths.ca_dir.join("client-ca.key")] {
            let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(add_user(&c, "alice", false).is_err(), "a second credential for alice is refused");
        assert!(add_user(&c, "../x", false).is_err() && add_user(&c, "", false).is_err());
        // Repeating init changes nothing.
        let before = std::fs::read(paths.node_cert(1)).expect("read");
        init(&c).expect("init again");
        assert_eq!(std::fs::read(paths.node_cert(1)).expect("read"), before);
    }

    // A revocation names the key, not the user: the list holds its fingerprint, the files
    // go, a new credential of the same name has another key, and a list that does not read
    // is an error naming the line, never an empty list.
    #[test]
    fn a_revoked_certificate_is_listed_by_fingerprint_and_a_bad_list_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path());
        let paths = init(&c).expect("init");
        assert!(read_revoked(&paths.revoked()).expect("no file").is_empty());
        let bob = add_user(&c, "bob", false).expect("add bob");
        let issued = load_certs(&bob.cert).expect("cert").remove(0);
        let first = key_fingerprint(&issued).expect("a key");
        // Another certificate for the same key (other bytes, as a re-encoded signature would
        // have) has the same fingerprint.
        let key = KeyPair::from_pem(&std::fs::read_to_string(&bob.key).expect("key")).expect("bob's key");
        let issuer = ca_issuer(&paths, "client").expect("the client CA");
        let other =
            CertificateParams::new(Vec::<String>::new()).expect("params").signed_by(&key, &issuer).expect("sign");
        assert_ne!(other.der().as_ref(), issued.as_ref());
        assert_eq!(key_fingerprint(other.der()).expect("a key"), first);
        let r = revoke_user(&c, "bob").expect("revoke bob");
        assert_eq!((r.user.as_str(), r.fingerprint.as_str()), ("bob", first.as_str()));
        assert!(!paths.user_dir("bob").exists(), "the revoked files are deleted");
        assert!(revoke_user(&c, "bob").is_err(), "nothing left to revoke");
        let again = add_user(&c, "bob", false).expect("a new credential for bob");
        let second = key_fingerprint(&load_certs(&again.cert).expect("cert").remove(0)).expect("a key");
        assert_ne!(first, second);
        assert_eq!(read_revoked(&paths.revoked()).expect("read"), [first.clone()].into());
        revoke_user(&c, "bob").expect("revoke the new one too");
        assert_eq!(read_revoked(&paths.revoked()).expect("read"), [first.clone(), second].into());

        let text = std::fs::read_to_string(paths.revoked()).expect("read");
        std::fs::write(paths.revoked(), format!("{text}not-a-fingerprint bob\n")).expect("write");
        let e = read_revoked(&paths.revoked()).expect_err("a line without a fingerprint");
        assert!(e.to_string().contains("line 4"), "{e}");
        std::fs::write(paths.revoked(), format!("{text}{}\n", &first[..63])).expect("write");
        assert!(read_revoked(&paths.revoked()).is_err(), "a cut fingerprint");
    }

    #[test]
    fn a_revoked_node_key_is_listed_its_files_go_and_init_issues_a_new_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path());
        let paths = init(&c).expect("init");
        let first = node_key_fingerprint(&paths, 1).expect("node 1's key");
        let r = revoke_node(&c, 1).expect("revoke node 1");
        assert_eq!((r.user.as_str(), r.fingerprint.as_str()), ("node1", first.as_str()));
        assert!(!paths.node_key(1).exists() && !paths.node_cert(1).exists(), "the revoked files are deleted");
        assert!(paths.user_dir(ADMIN_USER).exists(), "users keep theirs");
        assert_eq!(read_revoked(&paths.revoked()).expect("read"), [first.clone()].into());
        let text = std::fs::read_to_string(paths.revoked()).expect("read");
        assert!(text.lines().any(|l| l.starts_with(&format!("{first} node1 "))), "{text}");
        let e = revoke_node(&c, 1).expect_err("nothing left to revoke").to_string();
        assert!(e.contains("no certificate to revoke"), "{e}");
        assert!(revoke_node(&c, 9).is_err(), "no node 9 in the file");
        init(&c).expect("init again");
        let second = node_key_fingerprint(&paths, 1).expect("node 1's new key");
        assert_ne!(first, second);
        assert_eq!(read_revoked(&paths.revoked()).expect("read"), [first].into(), "the new key is not revoked");
    }

    #[test]
    fn a_node_is_told_whether_its_material_is_missing_or_unreadable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path());
        let err = node_material(&c, 1).expect_err("nothing made yet").to_string();
        assert!(err.contains("is missing: make the cluster's TLS material first"), "{err}");
        let paths = init(&c).expect("init");
        node_material(&c, 1).expect("made");
        // The node's key replaced by a link to itself: there, but it cannot be opened (as a
        // file this user may not read; root, which runs the tests, reads any).
        std::fs::remove_file(paths.node_key(1)).expect("remove key");
        std::os::unix::fs::symlink(paths.node_key(1), paths.node_key(1)).expect("a link loop");
        let err = node_material(&c, 1).expect_err("unreadable").to_string();
        assert!(err.contains("cannot read") && !err.contains("missing"), "{err}");
    }
}
