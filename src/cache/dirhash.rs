//! Go's dirhash "Hash1" over a zip's files, the `h1:` hash Terraform records for a provider
//! package it installed: sha256 of the sorted lines `"{hex sha256 of file}  {name}\n"`,
//! base64-encoded.

use base64::Engine;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek};

pub fn hash1_zip<R: Read + Seek>(reader: R) -> Result<String, String> {
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| e.to_string())?;
    let mut names = archive
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| e.to_string())?;
    names.sort();
    let mut summary = Sha256::new();
    for name in &names {
        if name.contains('\n') {
            return Err(format!("file name {name:?} contains a newline"));
        }
        let mut file = archive.by_name(name).map_err(|e| e.to_string())?;
        let mut h = Sha256::new();
        std::io::copy(&mut file, &mut h).map_err(|e| e.to_string())?;
        summary.update(format!("{}  {name}\n", hex::encode(h.finalize())).as_bytes());
    }
    Ok(format!(
        "h1:{}",
        base64::engine::general_purpose::STANDARD.encode(summary.finalize())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    #[test]
    fn hash1_matches_the_go_definition_for_a_small_zip() {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        w.start_file("b.txt", opts).unwrap();
        w.write_all(b"bee").unwrap();
        w.start_file("a.txt", opts).unwrap();
        w.write_all(b"ay").unwrap();
        let zip = w.finish().unwrap().into_inner();
        // The same computation spelled out: sorted names, two spaces, trailing newline.
        let line =
            |data: &[u8], name: &str| format!("{}  {name}\n", hex::encode(Sha256::digest(data)));
        let summary = format!("{}{}", line(b"ay", "a.txt"), line(b"bee", "b.txt"));
        let expected = format!(
            "h1:{}",
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(summary.as_bytes()))
        );
        assert_eq!(hash1_zip(Cursor::new(zip)).unwrap(), expected);
        assert!(hash1_zip(Cursor::new(b"not a zip".to_vec())).is_err());
    }
}
