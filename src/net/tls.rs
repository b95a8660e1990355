//! TLS material (the cluster's two CAs, node certificates, client credentials) and the
//! rustls side of each QUIC endpoint; the transport limits are in [`super::quic`].
//!
//! Two certificate authorities live in the cluster's `tls_dir`, made on first start:
//! - the **node CA** signs one certificate per node (SAN `node{N}`, `localhost`, 127.0.0.1).
//!   Peer links are mutual TLS under it, so only nodes can speak Raft; clients verify the
//!   node they dial against it.
//! - the **client CA** signs client credentials. A node's client endpoint requires a client
//!   certificate under it: a client credential cannot open a peer link, and a node
//!   certificate is not a client credential.
//!
//! Material is generated into a temporary directory and renamed into place, so concurrent
//! first starts agree on one CA. Only the ring crypto provider is compiled in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
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

/// A TLS failure while doing `context`, keeping its cause.
fn tls_err<E: Into<crate::error::BoxError>>(context: impl Into<String>) -> impl FnOnce(E) -> Error {
    let context = context.into();
    move |e| Error::Tls { context, source: e.into() }
}

/// The server name a node's certificate is issued for.
pub fn node_name(id: u64) -> String {
    format!("node{id}")
}

/// Paths of the material in a TLS directory.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub dir: PathBuf,
}

impl TlsPaths {
    pub fn node_ca(&self) -> PathBuf {
        self.dir.join("node-ca.pem")
    }
    fn node_ca_key(&self) -> PathBuf {
        self.dir.join("node-ca.key")
    }
    pub fn client_ca(&self) -> PathBuf {
        self.dir.join("client-ca.pem")
    }
    pub fn node_cert(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node{id}.pem"))
    }
    pub fn node_key(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node{id}.key"))
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err("making CA parameters"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn leaf(names: Vec<String>, cn: &str, issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let mut params = CertificateParams::new(names).map_err(tls_err("making certificate parameters"))?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.use_authority_key_identifier_extension = true;
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(tls_err("generating a key"))?;
    let cert = params.signed_by(&key, issuer).map_err(tls_err("signing a certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn node_leaf(id: u64, issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    leaf(vec![node_name(id), "localhost".into(), "127.0.0.1".into()], &node_name(id), issuer)
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Makes sure the CAs, a certificate for every node of `config` and a client credential
/// exist in `config.tls_dir`, generating what is missing.
pub fn ensure_material(config: &Config) -> Result<TlsPaths> {
    let paths = TlsPaths { dir: config.tls_dir.clone() };
    if !paths.node_ca().exists() {
        generate_fresh(&paths)?;
    }
    let missing: Vec<u64> = config.nodes.iter().map(|n| n.id).filter(|id| !paths.node_cert(*id).exists()).collect();
    if !missing.is_empty() {
        let ca_pem = std::fs::read_to_string(paths.node_ca())?;
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(paths.node_ca_key())?)
            .map_err(tls_err("reading the node CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(tls_err("loading the node CA"))?;
        for id in missing {
            let (cert, key) = node_leaf(id, &issuer)?;
            let tmp = paths.dir.join(format!(".node{id}.{}.key", std::process::id()));
            write_private(&tmp, &key)?;
            std::fs::rename(&tmp, paths.node_key(id))?;
            let tmp = paths.dir.join(format!(".node{id}.{}.pem", std::process::id()));
            std::fs::write(&tmp, cert)?;
            std::fs::rename(&tmp, paths.node_cert(id))?;
        }
    }
    Ok(paths)
}

fn generate_fresh(paths: &TlsPaths) -> Result<()> {
    let parent = paths.dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".tls-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&tmp)?;
    let tmp_paths = TlsPaths { dir: tmp.clone() };

    let node_ca_key = KeyPair::generate().map_err(tls_err("generating the node CA key"))?;
    let node_ca_params = ca_params("convoy node CA")?;
    let node_ca = node_ca_params.self_signed(&node_ca_key).map_err(tls_err("self-signing the node CA"))?;
    std::fs::write(tmp_paths.node_ca(), node_ca.pem())?;
    write_private(&tmp_paths.node_ca_key(), &node_ca_key.serialize_pem())?;

    let client_ca_key = KeyPair::generate().map_err(tls_err("generating the client CA key"))?;
    let client_ca_params = ca_params("convoy client CA")?;
    let client_ca = client_ca_params.self_signed(&client_ca_key).map_err(tls_err("self-signing the client CA"))?;
    std::fs::write(tmp_paths.client_ca(), client_ca.pem())?;
    write_private(&tmp_paths.dir.join("client-ca.key"), &client_ca_key.serialize_pem())?;
    let client_issuer = Issuer::new(client_ca_params, client_ca_key);
    let (cert, key) = leaf(vec!["client".into()], "convoy client", &client_issuer)?;
    std::fs::write(tmp_paths.client_cert(), cert)?;
    write_private(&tmp_paths.client_key(), &key)?;

    match std::fs::rename(&tmp, &paths.dir) {
        Ok(()) => Ok(()),
        // Another process won the race (or the directory existed without a CA).
        Err(_) if paths.node_ca().exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(tls_err(format!("cannot create {}", paths.dir.display()))(e))
        }
    }
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

/// Client config: a node dialing peers (`Some(node_id)`) or a client (`None`).
pub fn client_config(paths: &TlsPaths, as_node: Option<u64>) -> Result<quinn::ClientConfig> {
    let (chain, key, link) = match as_node {
        Some(id) => (load_certs(&paths.node_cert(id))?, load_key(&paths.node_key(id))?, Link::Peer),
        None => (load_certs(&paths.client_cert())?, load_key(&paths.client_key())?, Link::Client),
    };
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
    let t = dialer_transport(link);
    config.transport_config(Arc::new(t));
    Ok(config)
}
