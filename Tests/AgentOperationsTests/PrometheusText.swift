import Foundation

/// A strict reader of the Prometheus text format (0.0.4), written from the format's description, to check
/// what `/metrics` serves: every line must be a comment, `# TYPE`/`# HELP`, or `name{labels} value`.
struct PrometheusText {
    struct Sample: Equatable {
        let name: String
        let labels: [String: String]
        let value: Double
    }
    var samples: [Sample] = []
    var types: [String: String] = [:]

    struct ParseError: Error, CustomStringConvertible { let description: String }

    init(_ text: String) throws {
        for raw in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = String(raw)
            if line.hasPrefix("#") {
                let parts = line.split(separator: " ", maxSplits: 3).map(String.init)
                if parts.count >= 4, parts[1] == "TYPE" {
                    guard ["counter", "gauge", "histogram", "summary", "untyped"].contains(parts[3]) else {
                        throw ParseError(description: "bad TYPE line: \(line)")
                    }
                    guard types[parts[2]] == nil else { throw ParseError(description: "second TYPE for \(parts[2])") }
                    types[parts[2]] = parts[3]
                }
                continue
            }
            samples.append(try Self.sample(line))
        }
    }

    static func sample(_ line: String) throws -> Sample {
        let chars = Array(line)
        var i = 0
        func fail(_ why: String) -> ParseError { ParseError(description: "\(why) in line \(line.debugDescription)") }
        var name = ""
        while i < chars.count, chars[i].isLetter || chars[i].isNumber || chars[i] == "_" || chars[i] == ":" { name.append(chars[i]); i += 1 }
        guard !name.isEmpty, !(name.first!.isNumber) else { throw fail("no metric name") }
        var labels: [String: String] = [:]
        if i < chars.count, chars[i] == "{" {
            i += 1
            while i < chars.count, chars[i] != "}" {
                var key = ""
                while i < chars.count, chars[i].isLetter || chars[i].isNumber || chars[i] == "_" { key.append(chars[i]); i += 1 }
                guard !key.isEmpty, i + 1 < chars.count, chars[i] == "=", chars[i + 1] == "\"" else { throw fail("bad label") }
                i += 2
                var value = ""
                while i < chars.count, chars[i] != "\"" {
                    if chars[i] == "\\", i + 1 < chars.count {
                        i += 1
                        switch chars[i] { case "n": value.append("\n"); case "\\": value.append("\\"); case "\"": value.append("\""); default: throw fail("bad escape") }
                    } else {
                        value.append(chars[i])
                    }
                    i += 1
                }
                guard i < chars.count else { throw fail("unterminated label value") }
                i += 1
                guard labels[key] == nil else { throw fail("duplicate label \(key)") }
                labels[key] = value
                if i < chars.count, chars[i] == "," { i += 1 }
            }
            guard i < chars.count else { throw fail("unterminated labels") }
            i += 1
        }
        guard i < chars.count, chars[i] == " " else { throw fail("no space before the value") }
        let rest = String(chars[(i + 1)...]).split(separator: " ")
        guard (1...2).contains(rest.count) else { throw fail("bad value/timestamp") }
        let v: Double?
        switch rest[0] {
        case "+Inf": v = .infinity
        case "-Inf": v = -.infinity
        case "NaN": v = .nan
        default: v = Double(rest[0])
        }
        guard let value = v else { throw fail("value is not a number") }
        return Sample(name: name, labels: labels, value: value)
    }

    /// The one sample with this name and exactly these labels.
    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        let found = samples.filter { $0.name == name && $0.labels == labels }
        return found.count == 1 ? found[0].value : nil
    }

    func series(_ name: String) -> [Sample] { samples.filter { $0.name == name } }
}
