//! Certificates for TLS tests, made with the openssl CLI: a CA and a server certificate signed
//! by it, readable by the postgres user so a test cluster can use them too.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// `san` is the server certificate's subjectAltName, e.g. "DNS:localhost,IP:127.0.0.1".
    pub fn new(name: &str, san: &str) -> Certs {
        let dir = tempfile::Builder::new().prefix(&format!("pgwarp-certs-{name}-")).tempdir_in("/tmp").unwrap();
        let d = dir.path();
        let run = |args: &[&str]| openssl(d, args);
        let ca_subject = format!("/CN=pgwarp test CA {name}");
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            &ca_subject,
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(d.join("ext.cnf"), format!("subjectAltName={san}\n")).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        // Postgres reads its key as the postgres user and insists on 0600.
        if crate::common::running_as_root() {
            for f in ["server.key", "server.pem", "ca.pem"] {
                Command::new("chown").args(["postgres", d.join(f).to_str().unwrap()]).status().unwrap();
            }
            Command::new("chmod").args(["755", d.to_str().unwrap()]).status().unwrap();
        }
        Command::new("chmod").args(["600", d.join("server.key").to_str().unwrap()]).status().unwrap();
        Certs { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A client certificate with common name `cn`, signed by this CA: (certificate, key), the
    /// key readable by its owner only, as libpq insists.
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let (cert, key, csr) = (format!("client-{cn}.pem"), format!("client-{cn}.key"), format!("client-{cn}.csr"));
        let run = |args: &[&str]| openssl(d, args);
        let subject = format!("/CN={cn}");
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subject]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
        ]);
        Command::new("chmod").args(["600", d.join(&key).to_str().unwrap()]).status().unwrap();
        (d.join(cert), d.join(key))
    }
}

/// Runs the openssl CLI in `dir`, failing the test if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
