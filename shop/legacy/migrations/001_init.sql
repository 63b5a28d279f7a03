-- The monolith's tables, as it has always had them: everything is text, the
-- star rating included (the old review form posted whatever was typed).
CREATE TABLE Products (
    SKU          TEXT PRIMARY KEY NOT NULL,
    Title        TEXT NOT NULL,
    PriceEUR     TEXT NOT NULL,
    Discontinued TEXT NOT NULL
);

CREATE TABLE Reviews (
    ReviewID    TEXT PRIMARY KEY NOT NULL,
    SKU         TEXT NOT NULL,
    Stars       TEXT NOT NULL,
    Comment     TEXT NOT NULL,
    DisplayName TEXT NOT NULL,
    PostedOn    TEXT NOT NULL
);

-- Seed data (development). P1..P6 are the catalog's p-1..p-6, the products the new
-- catalog took over (same names, prices as the monolith wrote them).
INSERT INTO Products (SKU, Title, PriceEUR, Discontinued) VALUES
    ('P1', 'Trail running shoes', '129.99', 'N'),
    ('P2', 'Merino wool hiking socks', '18.99', 'N'),
    ('P3', 'Waterproof shell jacket', '249.00', 'N'),
    ('P4', 'Insulated steel water bottle', '29.50', 'N'),
    ('P5', 'Ultralight daypack 20 L', '89.90', 'N'),
    ('P6', 'Rechargeable LED headlamp', '44.99', 'N'),
    ('P7', 'Canvas rucksack (2009 range)', '59.00', 'Y');

-- Reviews, warts and all: P3 has what years of the old form let through (a half
-- star, "N/A" from a forum import, a 9 out of 5, a 0), P2 a reviewer with no name.
INSERT INTO Reviews (ReviewID, SKU, Stars, Comment, DisplayName, PostedOn) VALUES
    ('R1001', 'P1', '4', 'Good grip on wet rock.', 'Hiker42', '2019-03-02'),
    ('R1002', 'P1', '5', 'Ran a marathon in them, no blisters.', 'Trail Runner', '2020-07-19'),
    ('R1003', 'P2', '5', 'Warm and they do not itch.', 'Mia K.', '2018-11-30'),
    ('R1004', 'P2', ' 3 ', '  Thin after one season.  ', '', '2021-01-05'),
    ('R1005', 'P3', '4.5', 'Kept me dry on the ridge.', 'Tom', '2017-05-14'),
    ('R1006', 'P3', 'N/A', 'Imported from the 2014 forum.', 'forum-import', '2014-02-01'),
    ('R1007', 'P3', '9', 'Best jacket ever!!!', 'Spammy', '2016-08-08'),
    ('R1008', 'P3', '0', 'Never arrived.', 'Jo', '2016-09-09'),
    ('R1009', 'P5', '3', 'Straps dig in when it is full.', 'Ana', '2022-04-22'),
    ('R1010', 'P7', '2', 'The canvas leaks.', 'old-timer', '2010-10-10');
