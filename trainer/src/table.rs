//! CSV files the trainer reads and writes (manifests, predictions, explanations), quoted and
//! unquoted by the csv crate so that a path or class name holding a comma or a quote survives
//! the round trip.

use std::path::Path;

/// A CSV document built row by row and written atomically.
pub struct CsvTable {
    writer: csv::Writer<Vec<u8>>,
}

impl CsvTable {
    /// A table with this header row.
    pub fn new<S: AsRef<str>>(header: impl IntoIterator<Item = S>) -> Self {
        let mut table = CsvTable { writer: csv::WriterBuilder::new().from_writer(Vec::new()) };
        table.row(header);
        table
    }

    /// Appends one row; cells are quoted where they need it.
    pub fn row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) {
        // Writing into a Vec cannot fail, and every row may have its own length.
        self.writer.write_record(cells.into_iter().map(|c| c.as_ref().to_string())).expect("writing CSV into memory");
    }

    /// The document's bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.writer.into_inner().expect("flushing CSV into memory")
    }

    /// Writes the document to `path` atomically (a temporary file renamed into place).
    pub fn write_atomic(self, path: &Path) -> std::io::Result<()> {
        crate::st::write_atomic(path, &self.into_bytes())
    }
}

/// A CSV record read from a file: its 1-based line and its cells, trimmed.
pub struct CsvRecord {
    /// The line the record starts on.
    pub line: usize,
    /// The record's cells.
    pub cells: Vec<String>,
}

/// Every non-empty record of a CSV document (quotes removed, cells trimmed), or the line and
/// reason of the first malformed one.
pub fn read_records(text: &str) -> Result<Vec<CsvRecord>, (usize, String)> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(text.as_bytes());
    let mut records = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| (e.position().map_or(0, |p| p.line() as usize), e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let cells: Vec<String> = record.iter().map(str::to_string).collect();
        if cells.iter().all(String::is_empty) {
            continue;
        }
        records.push(CsvRecord { line, cells });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_with_commas_quotes_and_newlines_survive_a_round_trip() {
        let awkward = ["/data/a,b.png", "say \"hi\".png", "two\nlines", " padded "];
        let mut table = CsvTable::new(["path", "label"]);
        for cell in awkward {
            table.row([cell, "x,y"]);
        }
        let text = String::from_utf8(table.into_bytes()).unwrap();
        let records = read_records(&text).unwrap();
        assert_eq!(records.len(), 5);
        for (record, cell) in records[1..].iter().zip(awkward) {
            assert_eq!(record.cells, vec![cell.trim().to_string(), "x,y".to_string()]);
        }
    }
}
