//! The XMP packet every PNG loralab writes carries (in an `iTXt` chunk with keyword
//! `XML:com.adobe.xmp`, the place XMP Part 3 gives it in PNG): the image is marked as made by a
//! trained model (IPTC `DigitalSourceType` = `trainedAlgorithmicMedia`), with the software
//! (`xmp:CreatorTool`), the model (IPTC 2025.1 `AISystemUsed`) and, in loralab's own namespace,
//! the model's and the adapters' files with their SHA-256 hashes and licences.
//!
//! ```xml
//! <x:xmpmeta xmlns:x="adobe:ns:meta/">
//!  <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
//!   <rdf:Description rdf:about="" xmlns:xmp=… xmlns:Iptc4xmpExt=… xmlns:loralab=…>
//!    <Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia</…>
//!    <xmp:CreatorTool>loralab 0.1.0</xmp:CreatorTool>
//!    <loralab:model rdf:parseType="Resource"> name, licence, files: Seq of {path, bytes, sha256} </…>
//!    <loralab:adapters><rdf:Seq><rdf:li rdf:parseType="Resource"> name, file, sha256, … </…>
//! ```
//!
//! Pure text building, no I/O: the browser build uses it as the command line does.

/// The PNG `iTXt` keyword of an XMP packet.
pub const KEYWORD: &str = "XML:com.adobe.xmp";
/// IPTC's term for media made by a model trained on sampled content.
pub const TRAINED_ALGORITHMIC_MEDIA: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";
/// Namespaces the packet uses.
pub const NS_RDF: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#";
pub const NS_XMP: &str = "http://ns.adobe.com/xap/1.0/";
pub const NS_DC: &str = "http://purl.org/dc/elements/1.1/";
pub const NS_IPTC_EXT: &str = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/";
/// loralab's properties: the model's and adapters' files.
pub const NS_LORALAB: &str = "urn:loralab:xmp:provenance:1.0#";

/// `loralab X.Y.Z`, the value of `xmp:CreatorTool`.
pub fn creator_tool() -> String {
    format!("loralab {}", env!("CARGO_PKG_VERSION"))
}

/// One file of a model or adapter: its name (relative to the model folder, never a local
/// directory), size and SHA-256 (lowercase hex) of its whole content.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FileRecord {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The model an image was made with.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ModelRecord {
    pub name: String,
    /// The licence as the model states it (`creativeml-openrail-m`, `MIT OR Apache-2.0`).
    pub licence: Option<String>,
    /// The weight files (three for a diffusers folder, one for a single-file checkpoint).
    pub files: Vec<FileRecord>,
}

/// An adapter applied to an image.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct AdapterRecord {
    pub name: String,
    pub file: Option<FileRecord>,
    /// (text encoder, UNet) strengths; `None` where they vary (an X/Y grid).
    pub strengths: Option<(f32, f32)>,
    pub licence: Option<String>,
    /// The checkpoint it was trained on, as its metadata says (`ss_sd_model_name`).
    pub trained_on: Option<String>,
}

/// What the packet says about one image.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    pub creator_tool: String,
    pub model: ModelRecord,
    pub adapters: Vec<AdapterRecord>,
    /// A one-line description (`dc:description`), e.g. what an X/Y grid shows.
    pub description: Option<String>,
}

impl Provenance {
    /// A record for `model` made by this version of loralab.
    pub fn new(model: ModelRecord, adapters: Vec<AdapterRecord>) -> Self {
        Provenance { creator_tool: creator_tool(), model, adapters, description: None }
    }

    /// The XMP packet (UTF-8 RDF/XML in an `xpacket` wrapper).
    pub fn to_xmp(&self) -> String {
        let mut o = String::with_capacity(2048);
        o.push_str("<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n");
        o.push_str("<x:xmpmeta xmlns:x=\"adobe:ns:meta/\" x:xmptk=\"");
        o.push_str(&escape(&self.creator_tool));
        o.push_str("\">\n");
        o.push_str(&format!(" <rdf:RDF xmlns:rdf=\"{NS_RDF}\">\n"));
        o.push_str(&format!(
            "  <rdf:Description rdf:about=\"\"\n    xmlns:xmp=\"{NS_XMP}\"\n    xmlns:dc=\"{NS_DC}\"\n    \
             xmlns:Iptc4xmpExt=\"{NS_IPTC_EXT}\"\n    xmlns:loralab=\"{NS_LORALAB}\">\n"
        ));
        element(&mut o, 3, "Iptc4xmpExt:DigitalSourceType", TRAINED_ALGORITHMIC_MEDIA);
        element(&mut o, 3, "xmp:CreatorTool", &self.creator_tool);
        if !self.model.name.is_empty() {
            element(&mut o, 3, "Iptc4xmpExt:AISystemUsed", &self.model.name);
        }
        if let Some(d) = &self.description {
            o.push_str("   <dc:description>\n    <rdf:Alt>\n     <rdf:li xml:lang=\"x-default\">");
            o.push_str(&escape(d));
            o.push_str("</rdf:li>\n    </rdf:Alt>\n   </dc:description>\n");
        }
        model(&mut o, &self.model);
        if !self.adapters.is_empty() {
            o.push_str("   <loralab:adapters>\n    <rdf:Seq>\n");
            for a in &self.adapters {
                adapter(&mut o, a);
            }
            o.push_str("    </rdf:Seq>\n   </loralab:adapters>\n");
        }
        o.push_str("  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"r\"?>");
        o
    }
}

/// `<name>escaped value</name>` on its own line at `indent` spaces.
fn element(o: &mut String, indent: usize, name: &str, value: &str) {
    o.push_str(&" ".repeat(indent));
    o.push('<');
    o.push_str(name);
    o.push('>');
    o.push_str(&escape(value));
    o.push_str("</");
    o.push_str(name);
    o.push_str(">\n");
}

fn file(o: &mut String, indent: usize, f: &FileRecord) {
    element(o, indent, "loralab:path", &f.path);
    element(o, indent, "loralab:bytes", &f.bytes.to_string());
    element(o, indent, "loralab:sha256", &f.sha256);
}

fn model(o: &mut String, m: &ModelRecord) {
    o.push_str("   <loralab:model rdf:parseType=\"Resource\">\n");
    element(o, 4, "loralab:name", &m.name);
    if let Some(l) = &m.licence {
        element(o, 4, "loralab:licence", l);
    }
    if !m.files.is_empty() {
        o.push_str("    <loralab:files>\n     <rdf:Seq>\n");
        for f in &m.files {
            o.push_str("      <rdf:li rdf:parseType=\"Resource\">\n");
            file(o, 7, f);
            o.push_str("      </rdf:li>\n");
        }
        o.push_str("     </rdf:Seq>\n    </loralab:files>\n");
    }
    o.push_str("   </loralab:model>\n");
}

fn adapter(o: &mut String, a: &AdapterRecord) {
    o.push_str("     <rdf:li rdf:parseType=\"Resource\">\n");
    element(o, 6, "loralab:name", &a.name);
    if let Some(f) = &a.file {
        file(o, 6, f);
    }
    if let Some((te, unet)) = a.strengths {
        element(o, 6, "loralab:textEncoderStrength", &te.to_string());
        element(o, 6, "loralab:unetStrength", &unet.to_string());
    }
    if let Some(l) = &a.licence {
        element(o, 6, "loralab:licence", l);
    }
    if let Some(t) = &a.trained_on {
        element(o, 6, "loralab:trainedOn", t);
    }
    o.push_str("     </rdf:li>\n");
}

/// `text` as XML character data or attribute value: `& < > " '` as entities, line breaks and
/// tabs as character references (so attribute values keep them), and characters XML 1.0 does
/// not allow (other control characters) replaced by U+FFFD.
pub fn escape(text: &str) -> String {
    let mut o = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\n' => o.push_str("&#xA;"),
            '\r' => o.push_str("&#xD;"),
            '\t' => o.push_str("&#x9;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Provenance {
        let mut p = Provenance::new(
            ModelRecord {
                name: "my <model> & \"co\"".into(),
                licence: Some("creativeml-openrail-m".into()),
                files: vec![FileRecord { path: "unet/diffusion_pytorch_model.safetensors".into(), bytes: 12, sha256: "ab".repeat(32) }],
            },
            vec![AdapterRecord {
                name: "style\u{1}".into(),
                file: Some(FileRecord { path: "style.safetensors".into(), bytes: 3, sha256: "cd".repeat(32) }),
                strengths: Some((0.5, 1.0)),
                licence: None,
                trained_on: Some("v1-5-pruned.safetensors".into()),
            }],
        );
        p.description = Some("line one\nline two".into());
        p
    }

    #[test]
    fn escapes_markup_and_drops_forbidden_characters() {
        assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
        assert_eq!(escape("x\u{0}y\n"), "x\u{fffd}y&#xA;");
        assert_eq!(escape("żółw 🐢"), "żółw 🐢");
    }

    #[test]
    fn packet_has_the_disclosure_and_no_raw_markup_from_values() {
        let x = sample().to_xmp();
        assert!(x.starts_with("<?xpacket begin=\"\u{feff}\""), "{x}");
        assert!(x.ends_with("<?xpacket end=\"r\"?>"), "{x}");
        assert!(x.contains(&format!("<Iptc4xmpExt:DigitalSourceType>{TRAINED_ALGORITHMIC_MEDIA}<")), "{x}");
        assert!(x.contains(&format!("<xmp:CreatorTool>loralab {}</xmp:CreatorTool>", env!("CARGO_PKG_VERSION"))));
        assert!(x.contains("my &lt;model&gt; &amp; &quot;co&quot;"), "{x}");
        assert!(!x.contains("<model>"));
        assert!(x.contains("style\u{fffd}"));
        assert!(x.contains("line one&#xA;line two"));
    }

    /// The text of the first element `ns:name` below `node`.
    fn text<'a>(node: roxmltree::Node<'a, 'a>, ns: &str, name: &str) -> Option<&'a str> {
        node.descendants().find(|n| n.has_tag_name((ns, name))).and_then(|n| n.text())
    }

    /// Checks a packet with an independent XML parser: namespaces resolved, values unescaped.
    fn check_packet(x: &str, p: &Provenance) {
        let doc = roxmltree::Document::parse(x).unwrap_or_else(|e| panic!("not well-formed XML: {e}\n{x}"));
        let root = doc.root_element();
        assert!(root.has_tag_name(("adobe:ns:meta/", "xmpmeta")));
        let desc = root.descendants().find(|n| n.has_tag_name((NS_RDF, "Description"))).expect("rdf:Description");
        assert_eq!(desc.attribute((NS_RDF, "about")), Some(""));
        assert_eq!(text(desc, NS_IPTC_EXT, "DigitalSourceType"), Some(TRAINED_ALGORITHMIC_MEDIA));
        assert_eq!(text(desc, NS_XMP, "CreatorTool"), Some(p.creator_tool.as_str()));
        assert_eq!(text(desc, NS_IPTC_EXT, "AISystemUsed"), Some(p.model.name.as_str()));
        let model = desc.children().find(|n| n.has_tag_name((NS_LORALAB, "model"))).expect("loralab:model");
        assert_eq!(model.attribute((NS_RDF, "parseType")), Some("Resource"));
        assert_eq!(text(model, NS_LORALAB, "name"), Some(p.model.name.as_str()));
        assert_eq!(text(model, NS_LORALAB, "licence"), p.model.licence.as_deref());
        let files: Vec<_> = model.descendants().filter(|n| n.has_tag_name((NS_RDF, "li"))).collect();
        assert_eq!(files.len(), p.model.files.len());
        for (li, f) in files.iter().zip(&p.model.files) {
            assert_eq!(text(*li, NS_LORALAB, "path"), Some(f.path.as_str()));
            assert_eq!(text(*li, NS_LORALAB, "sha256"), Some(f.sha256.as_str()));
            assert_eq!(text(*li, NS_LORALAB, "bytes"), Some(f.bytes.to_string().as_str()));
        }
        let adapters: Vec<_> = desc
            .children()
            .filter(|n| n.has_tag_name((NS_LORALAB, "adapters")))
            .flat_map(|n| n.descendants().filter(|n| n.has_tag_name((NS_RDF, "li"))).collect::<Vec<_>>())
            .collect();
        assert_eq!(adapters.len(), p.adapters.len());
        for (li, a) in adapters.iter().zip(&p.adapters) {
            // Characters XML cannot carry come back as U+FFFD.
            let cleaned: String = a.name.chars().map(|c| if (c as u32) < 0x20 && c != '\n' { '\u{fffd}' } else { c }).collect();
            assert_eq!(text(*li, NS_LORALAB, "name"), Some(cleaned.as_str()));
            assert_eq!(text(*li, NS_LORALAB, "sha256"), a.file.as_ref().map(|f| f.sha256.as_str()));
            let strength = |k| text(*li, NS_LORALAB, k).map(|v| v.parse::<f32>().expect("a number"));
            assert_eq!(strength("textEncoderStrength").zip(strength("unetStrength")), a.strengths);
            assert_eq!(text(*li, NS_LORALAB, "trainedOn"), a.trained_on.as_deref());
        }
        let description = desc.descendants().find(|n| n.has_tag_name((NS_DC, "description")));
        let alt = description.and_then(|d| d.descendants().find(|n| n.has_tag_name((NS_RDF, "li"))));
        assert_eq!(alt.and_then(|n| n.text()), p.description.as_deref());
        if let Some(li) = alt {
            assert_eq!(li.attribute(("http://www.w3.org/XML/1998/namespace", "lang")), Some("x-default"));
        }
    }

    #[test]
    fn an_xml_parser_reads_every_field_back() {
        let p = sample();
        check_packet(&p.to_xmp(), &p);
        let bare = Provenance::new(ModelRecord { name: "m".into(), ..Default::default() }, vec![]);
        check_packet(&bare.to_xmp(), &bare);
    }

    /// The chunk types of a PNG in order, checking lengths (the CRCs are checked by decoders).
    fn chunk_types(png: &[u8]) -> Vec<String> {
        let mut pos = 8;
        let mut out = vec![];
        while pos + 12 <= png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            out.push(String::from_utf8_lossy(&png[pos + 4..pos + 8]).into_owned());
            pos += 12 + len;
        }
        assert_eq!(pos, png.len(), "chunk lengths do not add up");
        out
    }

    /// The XMP text of a PNG read with the `png` crate's own decoder (CRCs checked), with the
    /// chunk's flags: (text, compressed, language tag).
    fn xmp_of(png_bytes: &[u8]) -> (String, bool, String) {
        let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = dec.read_info().expect("png crate reads the header");
        let mut buf = vec![0u8; reader.output_buffer_size().expect("size")];
        reader.next_frame(&mut buf).expect("png crate reads the image");
        reader.finish().expect("png crate reads to the end");
        let c = reader.info().utf8_text.iter().find(|c| c.keyword == KEYWORD).expect("an XMP iTXt chunk");
        (c.get_text().expect("UTF-8"), c.compressed, c.language_tag.clone())
    }

    #[test]
    fn png_carries_the_packet_and_stays_valid() {
        let p = sample();
        let x = p.to_xmp();
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        let bytes = crate::io::png::encode_rgb8_xmp(4, 3, &rgb, &[("parameters", "a cat\nSteps: 2")], &x).unwrap();
        let d = crate::io::png::decode(&bytes).unwrap();
        assert_eq!((d.width, d.height, d.channels), (4, 3, 3));
        assert_eq!(d.pixels, rgb);
        assert_eq!(d.text("parameters"), Some("a cat\nSteps: 2"));
        assert_eq!(d.text(KEYWORD), Some(x.as_str()));
        let (text, compressed, lang) = xmp_of(&bytes);
        assert_eq!((text.as_str(), compressed, lang.as_str()), (x.as_str(), false, ""));
        check_packet(&text, &p);
        let order = chunk_types(&bytes);
        let itxt = order.iter().position(|c| c == "iTXt").unwrap();
        assert!(itxt < order.iter().position(|c| c == "IDAT").unwrap(), "{order:?}");
    }

    #[test]
    fn xmp_goes_into_an_existing_png_once() {
        let rgb = vec![200u8; 2 * 2 * 3];
        let plain = crate::io::png::encode_rgb8(2, 2, &rgb, &[("Software", "a canvas")]).unwrap();
        let p = sample();
        let once = crate::io::png::add_xmp(&plain, &p.to_xmp(), "grid.png").unwrap();
        assert_eq!(chunk_types(&once)[..2], ["IHDR".to_string(), "iTXt".to_string()]);
        let d = crate::io::png::decode(&once).unwrap();
        assert_eq!((d.pixels.as_slice(), d.text("Software")), (rgb.as_slice(), Some("a canvas")));
        check_packet(&xmp_of(&once).0, &p);
        // Adding again replaces the packet instead of adding a second one.
        let mut other = p.clone();
        other.model.name = "other".into();
        let twice = crate::io::png::add_xmp(&once, &other.to_xmp(), "grid.png").unwrap();
        assert_eq!(chunk_types(&twice).iter().filter(|c| *c == "iTXt").count(), 1);
        check_packet(&xmp_of(&twice).0, &other);
        // Not a PNG, or cut off: errors naming the file.
        let e = crate::io::png::add_xmp(b"GIF89a....", "x", "a.gif").unwrap_err().to_string();
        assert!(e.contains("a.gif") && e.contains("not a PNG"), "{e}");
        let e = crate::io::png::add_xmp(&plain[..plain.len() - 6], "x", "cut.png").unwrap_err().to_string();
        assert!(e.contains("cut.png"), "{e}");
    }

    #[test]
    fn no_adapters_no_adapter_list() {
        let p = Provenance::new(ModelRecord { name: "m".into(), ..Default::default() }, vec![]);
        let x = p.to_xmp();
        assert!(!x.contains("loralab:adapters") && !x.contains("loralab:files") && !x.contains("dc:description"), "{x}");
    }
}
