//! Test helpers shared by the unit tests: an in-memory fleet PKI (rcgen) and a master catalogue.
//! Test-only; writes files into temporary directories.

use std::path::Path;

use outpost_protocol::{
    AtpRecord, CustomerRecord, Grant, MasterBatch, MasterChange, Money, Pool, PriceRecord, identity,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A fleet CA that can issue central's and sites' certificates.
pub struct Pki {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "test fleet CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// (certificate PEM, key PEM) for a site.
    pub fn site(&self, site: &str) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(identity::site_uri(site).try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// (certificate PEM, key PEM) for central under `name`.
    pub fn server(&self, name: &str) -> (String, String) {
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Signs a certificate for the key of a signing request (DER), naming `site`, valid for
    /// `days` from now: what central does for a renewal.
    pub fn sign_request(&self, site: &str, csr_der: &[u8], days: i64) -> String {
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(identity::site_uri(site).try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(days);
        csr.params = p;
        csr.signed_by(&self.issuer).unwrap().pem()
    }

    /// Writes `ca.pem`, `<site>.pem` and `<site>.key` into `dir`.
    pub fn write_site_files(&self, dir: &Path, site: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
        let (cert, key) = self.site(site);
        std::fs::write(dir.join(format!("{site}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{site}.key")), key).unwrap();
    }
}

/// A small catalogue for site `plant-1`: GEAR-12T with a list price (12.50) and an ACME price
/// (11.00), SPECIAL priced only for GLOBEX, ATP 40 for plant-1 (and 7 for plant-2, which must be
/// ignored), customer ACME.
pub fn catalogue(from_rev: u64, through_rev: u64) -> MasterBatch {
    let price = |sku: &str, customer: Option<&str>, amount: &str| {
        MasterChange::Price(PriceRecord {
            sku: sku.into(),
            customer: customer.map(Into::into),
            unit_price: Money::parse(amount).unwrap(),
            currency: "EUR".into(),
        })
    };
    MasterBatch {
        from_rev,
        through_rev,
        changes: vec![
            price("GEAR-12T", None, "12.50"),
            price("GEAR-12T", Some("ACME"), "11"),
            price("SPECIAL", Some("GLOBEX"), "5"),
            MasterChange::Atp(AtpRecord {
                sku: "GEAR-12T".into(),
                site: "plant-1".into(),
                available: 40,
            }),
            MasterChange::Atp(AtpRecord {
                sku: "GEAR-12T".into(),
                site: "plant-2".into(),
                available: 7,
            }),
            MasterChange::Customer(CustomerRecord {
                id: "ACME".into(),
                name: "Acme Corp".into(),
                credit_limit: Money::parse("50000").unwrap(),
                on_hold: false,
            }),
        ],
    }
}

/// A batch granting plant-1 each `(pool, qty)`.
pub fn grants(from_rev: u64, through_rev: u64, items: &[(Pool, i64)]) -> MasterBatch {
    MasterBatch {
        from_rev,
        through_rev,
        changes: items
            .iter()
            .map(|(pool, qty)| {
                MasterChange::Grant(Grant {
                    site: "plant-1".into(),
                    pool: pool.clone(),
                    qty: *qty,
                })
            })
            .collect(),
    }
}
