import NetAddress
import Testing

@Suite struct IPAddressTests {
    @Test(arguments: [
        ("203.0.113.10", "203.0.113.10"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),   // RFC 5952: first of equal-length runs
        ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"), // a single zero group is not compressed
        ("::", "::"),
        ("::1", "::1"),
        ("2001:db8::", "2001:db8::"),
        ("::ffff:192.0.2.1", "::ffff:c000:201"),
    ])
    func parsesAndPrintsCanonically(input: String, canonical: String) throws {
        let ip = try #require(IPAddress(input))
        #expect(ip.description == canonical)
        #expect(IPAddress(canonical) == ip)
    }

    @Test(arguments: ["", "1.2.3", "1.2.3.4.5", "256.0.0.1", "01.2.3.4", "1.2.3.4 ", "1..2.3", "2001:db8:::1",
                      "2001:db8::1::2", "1:2:3:4:5:6:7:8:9", "12345::", "[2001:db8::1]", "2001:db8::1%eth0", "gggg::", ":1", "1:"])
    func rejectsInvalid(input: String) {
        #expect(IPAddress(input) == nil)
    }

    @Test func ordersIPv4BeforeIPv6AndNumerically() {
        let list = ["2001:db8::2", "203.0.113.9", "2001:db8::10", "192.0.2.200", "203.0.113.10"].compactMap(IPAddress.init)
        #expect(list.sorted().map(\.description) == ["192.0.2.200", "203.0.113.9", "203.0.113.10", "2001:db8::2", "2001:db8::10"])
    }

    @Test func bytesRoundTrip() throws {
        for text in ["198.51.100.7", "2001:db8:1:2:3:4:5:6"] {
            let ip = try #require(IPAddress(text))
            #expect(IPAddress(bytes: ip.bytes) == ip)
        }
        #expect(IPAddress("198.51.100.7")!.bytes == [198, 51, 100, 7])
    }

    @Test func cidrContainment() throws {
        let v4 = try #require(CIDR("203.0.113.77/24"))
        #expect(v4.description == "203.0.113.0/24")
        #expect(v4.contains(IPAddress("203.0.113.1")!))
        #expect(!v4.contains(IPAddress("203.0.114.1")!))
        #expect(!v4.contains(IPAddress("2001:db8::1")!))
        let v6 = try #require(CIDR("2001:db8:100::/48"))
        #expect(v6.contains(IPAddress("2001:db8:100:ffff::1")!))
        #expect(!v6.contains(IPAddress("2001:db8:101::1")!))
        #expect(CIDR("0.0.0.0/0")!.contains(IPAddress("192.0.2.1")!))
        #expect(CIDR("2001:db8::1/128")!.contains(IPAddress("2001:db8::1")!))
        for bad in ["203.0.113.0", "203.0.113.0/33", "2001:db8::/129", "203.0.113.0/-1", "x/8", "203.0.113.0/+8"] {
            #expect(CIDR(bad) == nil, "\(bad)")
        }
    }
}

@Suite struct CIDRIntervalTests {
    @Test(arguments: [("203.0.113.0/25", "203.0.113.127"), ("192.0.2.7/32", "192.0.2.7"), ("0.0.0.0/0", "255.255.255.255"),
                      ("2001:db8:1::/48", "2001:db8:1:ffff:ffff:ffff:ffff:ffff"), ("2001:db8::/64", "2001:db8::ffff:ffff:ffff:ffff"),
                      ("2001:db8::1/128", "2001:db8::1"), ("::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")])
    func lastAddressAndBackFromTheInterval(text: String, last: String) throws {
        let c = try #require(CIDR(text))
        #expect(c.last == IPAddress(last)!)
        #expect(CIDR(first: c.address, last: c.last) == c)
    }

    @Test func anIntervalThatIsNotOneBlockHasNoCIDR() {
        #expect(CIDR(first: IPAddress("203.0.113.1")!, last: IPAddress("203.0.113.2")!) == nil)
        #expect(CIDR(first: IPAddress("203.0.113.0")!, last: IPAddress("203.0.113.2")!) == nil)
        #expect(CIDR(first: IPAddress("203.0.113.0")!, last: IPAddress("2001:db8::")!) == nil)
    }
}
