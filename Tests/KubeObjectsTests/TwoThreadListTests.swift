import Foundation
@testable import KubeObjects
import Testing

/// A big List is parsed by two threads: the caller's parser up to a split that a structural scan found, a
/// second thread from there to the list's end. Each case is read both ways, one thread and two (split at
/// several points), and must give the same objects, the same kept items, the same count and the same error.
@Suite struct TwoThreadListTests {
    enum Outcome: Equatable {
        case loaded(ClusterObjects, JSONValue, Int)
        case failed(String)
    }

    /// `twoThreads: false`: the one-thread parser. Else split near `fraction` of the document; `waitForSplit`: the
    /// first thread waits until the second has published its split (or given up), so the hand-over happens
    /// whatever the timing, and `handedOver` says how many items the second thread parsed.
    static func read(_ text: String, twoThreads: Bool, fraction: Double = 0.5, waitForSplit: Bool = true) -> Outcome {
        readCounting(text, twoThreads: twoThreads, fraction: fraction, waitForSplit: waitForSplit).outcome
    }

    static func readCounting(_ text: String, twoThreads: Bool, fraction: Double = 0.5, waitForSplit: Bool = true)
        -> (outcome: Outcome, handedOver: Int) {
        var objects = ClusterObjects()
        do {
            let (document, streamed, second) = try DocumentLoader.parseJSON(
                Array(text.utf8), from: 0, source: "big.json", into: &objects,
                twoThreadsFrom: twoThreads ? 0 : Int.max, splitFraction: fraction, awaitSplit: waitForSplit)
            return (.loaded(objects, document, streamed), second)
        } catch {
            return (.failed("\(error)"), 0)
        }
    }

    /// Where the two-thread read splits `text` (nil: it does not, and one thread reads everything).
    static func split(_ text: String, fraction: Double) -> (offset: Int, index: Int)? {
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBufferPointer {
            JSONParser.itemsSplit($0, from: 0, near: Int(Double(bytes.count) * fraction))
        }
    }

    static func service(_ i: Int, extra: String = "") -> String {
        #"{"apiVersion":"v1","kind":"Service","metadata":{"name":"s\#(i)","namespace":"n","annotations":{"x":"a \"quoted\" ] } , [ { text"}},"#
            + #""spec":{"externalIPs":["192.0.2.\#(i % 250 + 1)"],"ports":[{"name":"p","port":\#(1000 + i),"protocol":"TCP"}]\#(extra)}}"#
    }

    static func slice(_ i: Int) -> String {
        #"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"s\#(i)-a","namespace":"n","#
            + #""labels":{"kubernetes.io/service-name":"s\#(i)"},"items":["not","the","list"]},"addressType":"IPv4","#
            + #""ports":[{"name":"p","port":8080,"protocol":"TCP"}],"endpoints":[{"addresses":["198.51.100.\#(i % 250 + 1)"]}]}"#
    }

    /// A List as kubectl prints it (or minified), with keys before and after `items`, nested `items` keys
    /// and strings full of brackets, commas and escaped quotes that a careless scan would count.
    static func list(_ items: [String], pretty: Bool) -> String {
        let separator = pretty ? ",\n        " : ","
        return #"{"apiVersion":"v1","metadata":{"items":[{"a":1}],"note":"items: [ not this ]"},"items":"#
            + (pretty ? "[\n        " : "[") + items.joined(separator: separator) + (pretty ? "\n    ]" : "]")
            + #","kind":"List"}"#
    }

    static let fractions = [0.05, 0.3, 0.5, 0.7, 0.95]

    @Test(arguments: [false, true])
    func servicesSlicesAndOtherKindsComeOutTheSame(pretty: Bool) {
        var items: [String] = []
        for i in 0..<60 {
            items.append(Self.service(i))
            items.append(Self.slice(i))
            if i % 7 == 0 { items.append(#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c\#(i)"}}"#) }
        }
        let text = Self.list(items, pretty: pretty)
        let one = Self.read(text, twoThreads: false)
        guard case .loaded(let objects, _, let count) = one else { Issue.record("\(one)"); return }
        #expect(objects.services.count == 60 && objects.endpointSlices.count == 60 && count == items.count)
        for fraction in Self.fractions {
            let split = Self.split(text, fraction: fraction)
            // The split is real: an item's first byte, and that item's index.
            #expect(split != nil, "fraction \(fraction)")
            if let split {
                let before = text.utf8.prefix(split.offset)
                #expect(text.utf8.dropFirst(split.offset).first == UInt8(ascii: "{"))
                #expect(String(decoding: before, as: UTF8.self).components(separatedBy: #"{"apiVersion""#).count - 2 == split.index)
            }
            let two = Self.readCounting(text, twoThreads: true, fraction: fraction)
            #expect(two.outcome == one, "fraction \(fraction)")
            // The second thread really did its part: every item from the split on.
            #expect(two.handedOver == items.count - (split?.index ?? items.count), "fraction \(fraction)")
        }
    }

    /// Without waiting, the first thread may get to the split before the second publishes it (then it parses
    /// everything) or not: either way, the same result.
    @Test func whicheverThreadGetsThereFirstTheResultIsTheSame() {
        let items = (0..<200).map { $0 % 2 == 0 ? Self.service($0) : Self.slice($0) }
        let text = Self.list(items, pretty: false)
        let one = Self.read(text, twoThreads: false)
        var handedOver = 0
        for round in 0..<40 {
            let fraction = [0.01, 0.1, 0.5, 0.9][round % 4]
            let two = Self.readCounting(text, twoThreads: true, fraction: fraction, waitForSplit: false)
            #expect(two.outcome == one, "round \(round)")
            if two.handedOver > 0 { handedOver += 1 }
        }
        print("two-thread reads that handed over without waiting: \(handedOver) of 40")
    }

    /// Items without a kind (a typed list) are kept in the document, in their order, from both halves.
    @Test func keptItemsKeepTheirOrder() {
        var items: [String] = []
        for i in 0..<40 {
            items.append(i % 3 == 0 ? #"{"metadata":{"name":"k\#(i)","namespace":"n"},"spec":{"ports":[{"port":\#(i + 1)}]}}"# : Self.service(i))
        }
        let text = Self.list(items, pretty: true)
        let one = Self.read(text, twoThreads: false)
        guard case .loaded(_, let document, _) = one, case .array(let kept)? = document["items"] else { Issue.record("\(one)"); return }
        #expect(kept.count == 14)
        for fraction in Self.fractions {
            #expect(Self.read(text, twoThreads: true, fraction: fraction) == one, "fraction \(fraction)")
        }
    }

    /// A bad object or a syntax error, before the split, after it, or both: the error the one-thread reader
    /// gives (the first in the document, naming the same item index, line and column).
    @Test(arguments: [3, 57, 98])
    func theFirstErrorIsReported(at bad: Int) {
        for kind in ["port", "noname", "syntax", "both"] {
            var items = (0..<100).map { Self.service($0) }
            if kind == "port" || kind == "both" { items[bad] = Self.service(bad).replacingOccurrences(of: #""port":\#(1000 + bad)"#, with: #""port":70000"#) }
            // Without a name the error names the item by its index, which the second thread must count right.
            if kind == "noname" { items[bad] = Self.service(bad).replacingOccurrences(of: #""name":"s\#(bad)","#, with: "") }
            if kind == "syntax" { items[bad] = String(Self.service(bad).dropLast()) }
            if kind == "both" { items[99] = String(Self.service(99).dropLast()) }
            let text = Self.list(items, pretty: true)
            let one = Self.read(text, twoThreads: false)
            guard case .failed(let message) = one else { Issue.record("\(kind) \(bad): no error"); continue }
            let names = switch kind {
            case "syntax": "malformed JSON at line"
            case "noname": "items[\(bad)]"
            default: "n/s\(bad):"
            }
            #expect(message.contains(names), "\(kind): \(message)")
            for fraction in Self.fractions {
                #expect(Self.read(text, twoThreads: true, fraction: fraction) == one, "\(kind) \(bad) fraction \(fraction)")
            }
        }
    }

    /// Documents the scan must not split: no top-level `items` list, the list ends before the target, an
    /// `items` key spelled with an escape, a top-level array. They are still read, by one thread.
    @Test(arguments: [
        #"{"kind":"List","items":[{"kind":"ConfigMap","metadata":{"name":"a"}}],"metadata":{"items":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]}}"#,
        #"{"kind":"List","it\u0065ms":[{"kind":"ConfigMap","metadata":{"name":"a"}},{"kind":"ConfigMap","metadata":{"name":"b"}}]}"#,
        #"[{"kind":"ConfigMap","metadata":{"name":"a"}},{"kind":"ConfigMap","metadata":{"name":"b"}}]"#,
        // The parser streams both lists and counts on across them; the second thread could not know where.
        #"{"it\u0065ms":[{"kind":"ConfigMap","metadata":{"name":"a"}}],"items":[{"kind":"ConfigMap","metadata":{"name":"b"}},{"kind":"Service","metadata":{"namespace":"n"}},{"kind":"ConfigMap","metadata":{"name":"c"}}]}"#,
    ])
    func unsplittableDocumentsAreReadByOneThread(text: String) {
        #expect(Self.split(text, fraction: 0.6) == nil)
        #expect(Self.read(text, twoThreads: true, fraction: 0.6) == Self.read(text, twoThreads: false))
    }

    /// Through the public entry point: a List over the two-thread threshold loads as its halves would.
    @Test func aBigFileIsReadByTwoThreadsWithTheSameResult() throws {
        var items: [String] = []
        var i = 0
        var size = 0
        while size < DocumentLoader.twoThreadMinimumBytes + 4096 {
            let s = Self.service(i), e = Self.slice(i)
            items += [s, e]
            size += s.utf8.count + e.utf8.count + 2
            i += 1
        }
        let text = Self.list(items, pretty: false)
        let loaded = try DocumentLoader.load(Array(text.utf8), source: "big.json")
        #expect(loaded.services.count == i && loaded.endpointSlices.count == i)
        guard case .loaded(let one, _, _) = Self.read(text, twoThreads: false) else { Issue.record("one thread failed"); return }
        var expected = one
        expected.documents = 1
        #expect(loaded == expected && loaded.documents == 1)
        #expect(Self.split(text, fraction: 0.5) != nil)
    }
}
