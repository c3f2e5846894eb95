//! The few DER bytes that turn a SEC1 or PKCS#1 key into a PKCS#8
//! `PrivateKeyInfo` (RFC 5208): version 0, the algorithm, and the original
//! key as an OCTET STRING. Writing only: parsing is asn1-rs's.

/// `id-ecPublicKey` (1.2.840.10045.2.1), DER-encoded with its tag.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// `prime256v1` (1.2.840.10045.3.1.7).
pub(super) const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// `secp384r1` (1.3.132.0.34).
pub(super) const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// `rsaEncryption` (1.2.840.113549.1.1.1) followed by its NULL parameters.
const RSA_ENCRYPTION_NULL: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];

const SEQUENCE: u8 = 0x30;
const OCTET_STRING: u8 = 0x04;
const VERSION_0: &[u8] = &[0x02, 0x01, 0x00];

/// One DER TLV: `tag`, the definite length, `content`.
pub(super) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn private_key_info(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = VERSION_0.to_vec();
    body.extend(tlv(SEQUENCE, algorithm));
    body.extend(tlv(OCTET_STRING, key));
    tlv(SEQUENCE, &body)
}

/// PKCS#8 around a SEC1 `ECPrivateKey` on the curve `curve_oid` (one of the constants above).
pub(super) fn sec1_to_pkcs8(sec1: &[u8], curve_oid: &[u8]) -> Vec<u8> {
    private_key_info(&[OID_EC_PUBLIC_KEY, curve_oid].concat(), sec1)
}

/// PKCS#8 around a PKCS#1 `RSAPrivateKey`.
pub(super) fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    private_key_info(RSA_ENCRYPTION_NULL, pkcs1)
}
